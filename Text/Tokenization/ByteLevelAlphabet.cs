// The GPT-2 byte-to-unicode map that byte-level BPE uses as its 256-symbol base alphabet; not a tokenizer by itself.
namespace DeepSeekCluster.Text.Tokenization;

/// <summary>
/// Every byte gets one printable char so that byte strings can live in a JSON vocab as ordinary text:
/// the printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves, the other 68 bytes
/// map in byte order to U+0100, U+0101, ... (so the space 0x20 becomes 'Ġ' U+0120, '\n' becomes 'Ċ').
/// This is the table Hugging Face `tokenizers` and GPT-2 use, so vocabularies are interchangeable.
/// </summary>
public static class ByteLevelAlphabet
{
    private static readonly char[] ByteToCharTable = BuildByteToChar();
    private static readonly Dictionary<char, byte> CharToByteTable = BuildCharToByte();

    /// <summary>The char that stands for byte <paramref name="b"/>.</summary>
    public static char ByteToChar(byte b) => ByteToCharTable[b];

    /// <summary>The byte a char stands for, or false when the char is not one of the 256.</summary>
    public static bool TryCharToByte(char c, out byte b) => CharToByteTable.TryGetValue(c, out b);

    /// <summary>Maps raw bytes to their byte-level string (one char per byte).</summary>
    public static string BytesToString(ReadOnlySpan<byte> bytes)
    {
        return string.Create(bytes.Length, bytes.ToArray(), static (dst, src) =>
        {
            for (int i = 0; i < src.Length; i++) dst[i] = ByteToCharTable[src[i]];
        });
    }

    private static char[] BuildByteToChar()
    {
        var table = new char[256];
        var assigned = new bool[256];
        // These three ranges are printable and not whitespace, so they stand for themselves.
        for (int b = '!'; b <= '~'; b++) assigned[b] = true;
        for (int b = 0xA1; b <= 0xAC; b++) assigned[b] = true;
        for (int b = 0xAE; b <= 0xFF; b++) assigned[b] = true;
        int next = 0;
        for (int b = 0; b < 256; b++)
        {
            table[b] = assigned[b] ? (char)b : (char)(256 + next++);
        }
        return table;
    }

    private static Dictionary<char, byte> BuildCharToByte()
    {
        var map = new Dictionary<char, byte>(256);
        for (int b = 0; b < 256; b++) map[ByteToCharTable[b]] = (byte)b;
        return map;
    }
}
