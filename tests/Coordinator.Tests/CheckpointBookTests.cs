// The job's checkpoint records and the retention rule, as plain objects: which steps are complete, which may be deleted.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Grains;

namespace DeepSeekCluster.Coordinator.Tests;

public class CheckpointBookTests
{
    static CheckpointBook Committed(params long[] steps)
    {
        var book = new CheckpointBook();
        foreach (long s in steps) book.Commit(new CommittedCheckpoint(s, 1, 1, 100));
        return book;
    }

    [Theory]
    [InlineData(2, null, new long[] { 1, 2, 3 })]    // all but the newest two
    [InlineData(0, null, new long[0])]               // 0 keeps every checkpoint
    [InlineData(5, null, new long[0])]               // no more than keepLast exist
    [InlineData(9, null, new long[0])]
    [InlineData(1, null, new long[] { 1, 2, 3, 4 })] // the newest always stays
    [InlineData(2, 2L, new long[] { 1, 3 })]         // a generation resuming from step 2 may load it any moment
    [InlineData(1, 5L, new long[] { 1, 2, 3, 4 })]   // resuming from the newest: kept anyway
    [InlineData(2, 0L, new long[] { 1, 2, 3 })]      // resuming from the start needs no checkpoint
    public void RetentionDeletesAllButTheNewestKeepLastAndTheStepAResumeNeeds(int keepLast, long? resuming, long[] deletable)
    {
        var book = Committed(1, 2, 3, 4, 5);
        Assert.Equal(deletable, book.Deletable(keepLast, resuming));
    }

    [Fact]
    public void RetentionWaitsWhileACommitOlderThanTheNewestIsOnItsWay()
    {
        // Step 3's files are uploaded and its commit is queued, but 5 committed first: the store would take step 3's files
        // for leftovers of a save that never committed.
        var book = Committed(1, 2, 4, 5);
        Assert.NotNull(book.Report(1, 1, new CheckpointReport { Rank = 0, Step = 3, File = "rank-0.safetensors", ManifestJson = "{}" }));
        Assert.Empty(book.Deletable(1, null));
        book.NotCommitted(3);
        Assert.Equal([1L, 2L, 4L], book.Deletable(1, null));

        // A commit of a newer step on its way changes nothing, and the store is told to keep its files.
        Assert.NotNull(book.Report(1, 1, new CheckpointReport { Rank = 0, Step = 6, File = "rank-0.safetensors", ManifestJson = "{}" }));
        var deletable = book.Deletable(1, null);
        Assert.Equal([1L, 2L, 4L], deletable);
        Assert.Equal([5L, 6L], book.KeptBesides(deletable));
    }

    [Fact]
    public void DeletedStepsStayListedAndAreNeitherResumedFromNorDeletedAgain()
    {
        var book = Committed(2, 4, 6);
        book.Deleted([2, 4], DateTimeOffset.UnixEpoch);
        Assert.Equal([2L, 4L], book.Committed.Where(c => c.DeletedAt is not null).Select(c => c.Step));
        Assert.Equal(6, book.NewestCommitted);
        Assert.Empty(book.Deletable(1, null));
        book.Commit(new CommittedCheckpoint(8, 1, 1, 100));
        Assert.Equal([6L], book.Deletable(1, null));
    }

    [Fact]
    public void AStepIsHandedOverOnceWhenItsLastRankReportsAndKeptWithoutManifests()
    {
        var book = new CheckpointBook();
        Assert.Null(book.Report(3, 2, new CheckpointReport { Rank = 0, Step = 10, File = "rank-0.safetensors", ManifestJson = """{"step":10}""" }));
        Assert.Null(book.Report(3, 2, new CheckpointReport { Rank = 0, Step = 10, File = "rank-0.safetensors", ManifestJson = """{"step":10}""" })); // sent again
        var complete = book.Report(3, 2, new CheckpointReport { Rank = 1, Step = 10, File = "rank-1.safetensors" });
        Assert.NotNull(complete);
        Assert.Equal((10L, 3L, 2), (complete.Step, complete.Generation, complete.World));
        Assert.Equal("""{"step":10}""", complete.Files[0].ManifestJson); // the committer needs rank 0's manifest
        Assert.All(Assert.Single(book.Reported).Files, f => Assert.Equal("", f.ManifestJson));
        Assert.Equal([10L], book.Committing);

        Assert.Null(book.Report(3, 2, new CheckpointReport { Rank = 1, Step = 10, File = "rank-1.safetensors" })); // its commit is under way
        Assert.True(book.Commit(new CommittedCheckpoint(10, 3, 2, 200)));
        Assert.False(book.Commit(new CommittedCheckpoint(10, 3, 2, 200))); // a retried commit
        Assert.Empty(book.Committing);
        Assert.Equal(10, book.NewestCommitted);
    }
}
