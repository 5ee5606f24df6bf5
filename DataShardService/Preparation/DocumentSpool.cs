// A local temporary file of the kept (cleaned, deduplicated) documents, so later passes stream from disk, not memory.
namespace DeepSeekCluster.DataShardService.Preparation;

public readonly record struct SpooledDocument(int SourceIndex, UInt128 Hash, string Text);

public sealed class DocumentSpool(string path) : IDisposable
{
    private BinaryWriter? _writer = new(new BufferedStream(File.Create(path), 1 << 20));

    public long Count { get; private set; }

    public void Add(SpooledDocument doc)
    {
        var w = _writer ?? throw new InvalidOperationException("The spool is closed for writing.");
        w.Write(doc.SourceIndex);
        w.Write((ulong)doc.Hash);
        w.Write((ulong)(doc.Hash >> 64));
        w.Write(doc.Text);
        Count++;
    }

    public void CompleteWriting()
    {
        _writer?.Dispose();
        _writer = null;
    }

    public IEnumerable<SpooledDocument> Read()
    {
        if (_writer is not null)
            throw new InvalidOperationException("The spool is still being written.");
        using var r = new BinaryReader(new BufferedStream(File.OpenRead(path), 1 << 20));
        for (long i = 0; i < Count; i++)
        {
            int source = r.ReadInt32();
            ulong lo = r.ReadUInt64(), hi = r.ReadUInt64();
            yield return new SpooledDocument(source, new UInt128(hi, lo), r.ReadString());
        }
    }

    public void Dispose()
    {
        _writer?.Dispose();
        _writer = null;
        File.Delete(path);
    }
}
