// Link keys for tests that form rings and stage links: one per test run, as the coordinator makes one per generation.
using System.Security.Cryptography;

namespace DeepSeekCluster.Training.Tests.Collectives;

static class LinkKeys
{
    public static readonly byte[] Test = RandomNumberGenerator.GetBytes(32);
}
