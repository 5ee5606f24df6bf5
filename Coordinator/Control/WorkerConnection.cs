// One worker's open Connect stream, as seen from its grain: an observer whose calls become messages queued for the stream.
using System.Threading.Channels;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.Grains;
using Grpc.Core;
using GrainAssignment = DeepSeekCluster.Contracts.Grains.Assignment;

namespace DeepSeekCluster.Coordinator.Control;

public sealed class WorkerConnection : IWorkerControlObserver
{
    // One writer loop owns the response stream (gRPC stream writers are not safe for concurrent writes).
    private readonly Channel<CoordinatorMessage> _outbox = Channel.CreateUnbounded<CoordinatorMessage>(new UnboundedChannelOptions { SingleReader = true });

    /// <summary>The latest assignment pushed down; step and checkpoint reports go to its job.</summary>
    public GrainAssignment? Current { get; private set; }

    /// <summary>
    /// The last assignment, kept after a Stop: the final checkpoint of a completed job is uploaded and reported after
    /// the last step report (which completes the job), and its job grain still accepts it for that generation.
    /// </summary>
    public GrainAssignment? Last { get; private set; }

    public Task AssignedAsync(GrainAssignment a)
    {
        Current = a;
        Last = a;
        var message = new Contracts.Control.Assignment
        {
            JobId = a.JobId, Generation = a.Generation, Rank = a.Rank, World = a.World,
            DpRank = a.DpRank, DpSize = a.DpSize, PpStage = a.PpStage, PpSize = a.PpSize,
            JobSpecJson = a.SpecJson, ResumeStep = a.ResumeStep, LinkKey = Google.Protobuf.ByteString.CopyFrom(a.LinkKey),
            CheckpointOnly = a.CheckpointOnly,
        };
        foreach (var peer in a.Peers) message.Peers[peer.Rank] = peer.Endpoint;
        if (a.PpSize > 1)
            foreach (var peer in a.Peers) message.StagePeers[peer.Rank] = peer.PipelineEndpoint;
        Send(new CoordinatorMessage { Assignment = message });
        return Task.CompletedTask;
    }

    public Task AdoptedAsync(GrainAssignment a)
    {
        Current = a;
        Last = a;
        return Task.CompletedTask;
    }

    public Task CommandedAsync(ControlCommand c)
    {
        if (c.Kind == ControlCommandKind.Stop && (Current is null || Current.JobId == c.JobId || c.JobId == "")) Current = null;
        Send(c.Kind switch
        {
            ControlCommandKind.CheckpointNow => new CoordinatorMessage { CheckpointNow = new CheckpointNow { Generation = c.Generation, Step = c.Step } },
            ControlCommandKind.Rescale => new CoordinatorMessage { Rescale = new Rescale { Generation = c.Generation, Reason = c.Reason } },
            ControlCommandKind.Leave => new CoordinatorMessage { Leave = new Leave { Reason = c.Reason } },
            ControlCommandKind.NcclUniqueId => new CoordinatorMessage
            {
                NcclUniqueId = new NcclUniqueId { Generation = c.Generation, Group = c.Group, Id = Google.Protobuf.ByteString.CopyFrom(c.Payload), Reason = c.Reason },
            },
            _ => new CoordinatorMessage { Stop = new Stop { Generation = c.Generation, Reason = c.Reason } },
        });
        return Task.CompletedTask;
    }

    /// <summary>The export this process was ordered and has not finished: it fails if the stream ends first.</summary>
    public ExportOrder? Export { get; set; }

    public Task ExportOrderedAsync(ExportOrder order)
    {
        Export = order;
        Send(new CoordinatorMessage
        {
            ExportCheckpoint = new ExportCheckpoint { JobId = order.Job, Step = order.Step, Format = order.Format, Dataset = order.Dataset },
        });
        return Task.CompletedTask;
    }

    /// <summary>The evaluation share this process was ordered and has not finished: it fails if the stream ends first.</summary>
    public EvaluationOrder? Evaluation { get; set; }

    public Task EvaluationOrderedAsync(EvaluationOrder o)
    {
        Evaluation = o;
        var message = new EvaluateCheckpoint
        {
            EvaluationId = o.EvaluationId, JobId = o.Job, Step = o.Step, Dataset = o.Dataset, Limit = o.Limit, BatchSize = o.BatchSize,
            Rank = o.Rank, World = o.World, LinkKey = Google.Protobuf.ByteString.CopyFrom(o.LinkKey), ExportFormat = o.Export ?? "",
        };
        message.Tasks.AddRange(o.Tasks);
        message.Peers.AddRange(o.Peers);
        Send(new CoordinatorMessage { EvaluateCheckpoint = message });
        return Task.CompletedTask;
    }

    public void Send(CoordinatorMessage message) => _outbox.Writer.TryWrite(message);

    public void Complete() => _outbox.Writer.TryComplete();

    public async Task PumpAsync(IServerStreamWriter<CoordinatorMessage> stream, CancellationToken cancellationToken)
    {
        await foreach (var message in _outbox.Reader.ReadAllAsync(cancellationToken))
            await stream.WriteAsync(message, cancellationToken);
    }
}
