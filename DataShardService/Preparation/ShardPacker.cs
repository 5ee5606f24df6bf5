// Packs token streams of one split into fixed-size records of SampleTokens tokens, written to local shard files.
using System.Buffers.Binary;
using System.Security.Cryptography;

namespace DeepSeekCluster.DataShardService.Preparation;

/// <summary>A finished shard in the staging folder, with its store name and digest.</summary>
public sealed record PackedShard(string LocalPath, ShardEntry Entry);

/// <summary>
/// Documents arrive as token arrays ending in EOT (or with the EOT given apart); they are concatenated and cut into samples of
/// SampleTokens tokens (non-overlapping). A sample may hold the end of one document and the start of the next;
/// the tail shorter than one sample is dropped (counted in TokensDropped).
/// </summary>
public sealed class ShardPacker(string split, int sampleTokens, int tokenBytes, int samplesPerShard, string stagingDir) : IDisposable
{
    private readonly int[] _sample = new int[sampleTokens];
    private readonly byte[] _record = new byte[sampleTokens * tokenBytes];
    private readonly Queue<PackedShard> _finished = new();
    private int _filled;
    private FileStream? _file;
    private IncrementalHash? _sha;
    private string? _localPath;
    private long _shardSamples;

    public long Samples { get; private set; }
    public long Tokens { get; private set; }
    public long Documents { get; private set; }
    public long TokensDropped { get; private set; }
    public List<ShardEntry> Shards { get; } = [];

    public void Add(ReadOnlySpan<int> tokens)
    {
        Documents++;
        Append(tokens);
    }

    /// <summary>A document's tokens and then its end-of-text token (without copying them into one array).</summary>
    public void Add(ReadOnlySpan<int> tokens, int endOfText)
    {
        Documents++;
        Append(tokens);
        Append([endOfText]);
    }

    private void Append(ReadOnlySpan<int> tokens)
    {
        while (!tokens.IsEmpty)
        {
            int n = Math.Min(tokens.Length, sampleTokens - _filled);
            tokens[..n].CopyTo(_sample.AsSpan(_filled));
            _filled += n;
            tokens = tokens[n..];
            if (_filled == sampleTokens)
                WriteSample();
        }
    }

    /// <summary>Shards finished since the last call, oldest first.</summary>
    public IEnumerable<PackedShard> TakeFinished()
    {
        while (_finished.Count > 0)
            yield return _finished.Dequeue();
    }

    /// <summary>Drops the partial sample and closes the last shard.</summary>
    public void Complete()
    {
        TokensDropped += _filled;
        _filled = 0;
        CloseShard();
    }

    private void WriteSample()
    {
        if (_file is null)
        {
            _localPath = Path.Combine(stagingDir, $"{split}-{Shards.Count:D5}.bin");
            _file = new FileStream(_localPath, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20);
            _sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            _shardSamples = 0;
        }
        for (int i = 0; i < sampleTokens; i++)
        {
            if (tokenBytes == 2)
                BinaryPrimitives.WriteUInt16LittleEndian(_record.AsSpan(2 * i), checked((ushort)_sample[i]));
            else
                BinaryPrimitives.WriteUInt32LittleEndian(_record.AsSpan(4 * i), checked((uint)_sample[i]));
        }
        _file.Write(_record);
        _sha!.AppendData(_record);
        _filled = 0;
        _shardSamples++;
        Samples++;
        Tokens += sampleTokens;
        if (_shardSamples == samplesPerShard)
            CloseShard();
    }

    private void CloseShard()
    {
        if (_file is null)
            return;
        long bytes = _file.Length;
        _file.Dispose();
        _file = null;
        string name = Path.GetFileName(_localPath!);
        var entry = new ShardEntry(name, _shardSamples, bytes, Convert.ToHexStringLower(_sha!.GetHashAndReset()));
        _sha.Dispose();
        _sha = null;
        Shards.Add(entry);
        _finished.Enqueue(new PackedShard(_localPath!, entry));
    }

    public void Dispose()
    {
        _file?.Dispose();
        _sha?.Dispose();
    }
}
