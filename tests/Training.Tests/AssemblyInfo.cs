// Tests in this assembly run one class at a time: collective tests time peers out and the training tests
// measure resident memory, and both would read the other classes' load on 2 cores as their own.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
