// The server's MLA cache memory: fixed-size blocks of latent slots, preallocated once per model. Not a scheduler.
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Engine;

// Shape legend: L layers, N slots (blocks * block size), C kv_lora_rank, R qk_rope_head_dim.
/// <summary>
/// Per layer, one (N, C) latent and one (N, R) rotated-key tensor, allocated at start and never resized, so serving
/// neither fragments nor grows memory. A request owns whole blocks; slot s of block b is row b * BlockSize + s.
/// Only the engine thread allocates and frees; <see cref="BlocksInUse"/> is read by metrics from any thread.
/// </summary>
public sealed class LatentBlockPool : IDisposable
{
    readonly Tensor[] latent_LNC;
    readonly Tensor[] ropeKey_LNR;
    readonly Stack<int> free;
    int inUse;

    public LatentBlockPool(int layers, int blocks, int blockSize, long kvLoraRank, long ropeDim, ScalarType dtype, Device device)
    {
        if (blocks < 1) throw new ArgumentException($"Serving:CacheBlocks must be at least 1, got {blocks}");
        if (blockSize < 1) throw new ArgumentException($"Serving:BlockSize must be at least 1, got {blockSize}");
        BlockSize = blockSize;
        BlockCount = blocks;
        long slots = (long)blocks * blockSize;
        latent_LNC = new Tensor[layers];
        ropeKey_LNR = new Tensor[layers];
        for (int l = 0; l < layers; l++)
        {
            latent_LNC[l] = zeros(slots, kvLoraRank, dtype, device);
            ropeKey_LNR[l] = zeros(slots, ropeDim, dtype, device);
        }
        free = new Stack<int>(Enumerable.Range(0, blocks).Reverse());
        BytesPerBlock = (long)layers * blockSize * (kvLoraRank + ropeDim) * latent_LNC[0].ElementSize;
    }

    public int BlockSize { get; }
    public int BlockCount { get; }
    public long BytesPerBlock { get; }
    public int BlocksInUse => Volatile.Read(ref inUse);
    public int FreeBlocks => free.Count;

    public int BlocksFor(long tokens) => (int)((tokens + BlockSize - 1) / BlockSize);

    /// <summary>Takes <paramref name="count"/> blocks, or none when fewer are free (the caller then waits).</summary>
    public int[]? TryAllocate(int count)
    {
        if (count > free.Count) return null;
        var blocks = new int[count];
        for (int i = 0; i < count; i++) blocks[i] = free.Pop();
        Interlocked.Add(ref inUse, count);
        return blocks;
    }

    public void Release(int[] blocks)
    {
        foreach (var b in blocks) free.Push(b);
        Interlocked.Add(ref inUse, -blocks.Length);
    }

    /// <summary>The slot row of a request's token at <paramref name="position"/>.</summary>
    public long Slot(int[] blocks, long position) => (long)blocks[position / BlockSize] * BlockSize + position % BlockSize;

    internal Tensor Latent(int layer) => latent_LNC[layer];
    internal Tensor RopeKey(int layer) => ropeKey_LNR[layer];

    public void Dispose()
    {
        foreach (var t in latent_LNC) t.Dispose();
        foreach (var t in ropeKey_LNR) t.Dispose();
    }
}
