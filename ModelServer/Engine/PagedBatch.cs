// One forward pass's view of the block pool: which slots each row writes and reads. Holds no memory of its own.
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Engine;

// Shape legend: B rows (requests), T new tokens per row, S longest row after this step, C kv_lora_rank, R rope dim.
/// <summary>
/// Rows are requests at different positions: row b has <c>past[b]</c> cached tokens and appends T new ones.
/// Every layer writes the new entries into the row's blocks and gathers the row's whole history padded to S;
/// the visibility mask hides padding and future tokens, so each row attends exactly what it would alone.
/// </summary>
public sealed class PagedBatch : ILatentCache, IDisposable
{
    readonly LatentBlockPool pool;
    readonly long[] past;
    readonly long newTokens;
    readonly Tensor writeSlots_M;      // (B*T) pool rows for the new entries
    readonly Tensor readSlots_BS;      // (B*S) pool rows of each row's history, padding reads slot 0
    readonly Tensor visible_B1TS;
    readonly long rows, longest;
    // cos/sin of the rows' positions: the same for every layer, so made once per forward pass (not per layer).
    (RotaryEmbedding Of, Tensor Cos, Tensor Sin)? rotation;

    public PagedBatch(LatentBlockPool pool, IReadOnlyList<int[]> blocks, long[] past, long newTokens, Device device)
    {
        this.pool = pool;
        this.past = past;
        this.newTokens = newTokens;
        rows = past.Length;
        longest = past.Max() + newTokens;
        var write = new long[rows * newTokens];
        var read = new long[rows * longest];
        var visible = new bool[rows * newTokens * longest];
        for (int b = 0; b < rows; b++)
        {
            for (long t = 0; t < newTokens; t++)
            {
                write[b * newTokens + t] = pool.Slot(blocks[b], past[b] + t);
                // new token t of row b sits at position past[b] + t and sees positions 0..past[b] + t.
                long seen = past[b] + t + 1;
                for (long s = 0; s < seen; s++) visible[(b * newTokens + t) * longest + s] = true;
            }
            for (long s = 0; s < past[b] + newTokens; s++) read[b * longest + s] = pool.Slot(blocks[b], s);
        }
        writeSlots_M = tensor(write, device: device);
        readSlots_BS = tensor(read, device: device);
        visible_B1TS = tensor(visible, device: device).view(rows, 1, newTokens, longest);
    }

    public (Tensor cos, Tensor sin) Rotation(RotaryEmbedding rotary, int layer, long newTokens, ScalarType dtype, Device device)
    {
        if (rotation is not { } r || r.Of != rotary || r.Cos.dtype != dtype || r.Cos.device_type != device.type || newTokens != this.newTokens)
        {
            Forget();
            // Detached: the first layer's dispose scope must not free what the later layers use; Dispose frees them.
            var (cos, sin) = rotary.CosSin(past, newTokens, dtype, device);
            rotation = r = (rotary, cos.DetachFromDisposeScope(), sin.DetachFromDisposeScope());
        }
        return (r.Cos, r.Sin);
    }

    void Forget()
    {
        if (rotation is not { } r) return;
        r.Cos.Dispose();
        r.Sin.Dispose();
        rotation = null;
    }

    public LatentKeys Append(int layer, Tensor latent_BTC, Tensor ropeKey_BTR)
    {
        var latent_NC = pool.Latent(layer);
        var rope_NR = pool.RopeKey(layer);
        using (no_grad())
        {
            latent_NC.index_copy_(0, writeSlots_M, latent_BTC.reshape(rows * newTokens, -1));
            rope_NR.index_copy_(0, writeSlots_M, ropeKey_BTR.reshape(rows * newTokens, -1));
        }
        var latent_BSC = latent_NC.index_select(0, readSlots_BS).view(rows, longest, -1);
        var rope_BSR = rope_NR.index_select(0, readSlots_BS).view(rows, longest, -1);
        return new LatentKeys(latent_BSC, rope_BSR, visible_B1TS.alias());
    }

    public void Dispose()
    {
        writeSlots_M.Dispose();
        readSlots_BS.Dispose();
        visible_B1TS.Dispose();
        Forget();
    }
}
