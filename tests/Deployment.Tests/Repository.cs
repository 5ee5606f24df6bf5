// Where the repository is, and the files these tests read from it.
namespace DeepSeekCluster.Deployment.Tests;

public static class Repository
{
    /// <summary>The folder holding DeepSeekCluster.sln, found upwards from the test's output folder.</summary>
    public static string Root { get; } = FindRoot();

    public static string PathOf(params string[] parts) => Path.Combine([Root, .. parts]);

    public static string Read(params string[] parts) => File.ReadAllText(PathOf(parts));

    static string FindRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "DeepSeekCluster.sln"))) return dir.FullName;
        throw new InvalidOperationException($"no DeepSeekCluster.sln above {AppContext.BaseDirectory}");
    }

    /// <summary>The C# sources of one project folder, without build output.</summary>
    public static IEnumerable<string> SourcesOf(string projectFolder) =>
        Directory.EnumerateFiles(PathOf(projectFolder), "*.cs", SearchOption.AllDirectories)
            .Where(f => !f.Contains($"{Path.DirectorySeparatorChar}obj{Path.DirectorySeparatorChar}")
                     && !f.Contains($"{Path.DirectorySeparatorChar}bin{Path.DirectorySeparatorChar}"));
}
