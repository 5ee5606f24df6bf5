// IDatasetStore on a local folder: write under a temporary name beside the target, then rename (atomic on one volume).
using System.Text;
using DeepSeekCluster.DataShardService.Preparation;

namespace DeepSeekCluster.DataShardService.Storage;

public sealed class FolderDatasetStore(string root) : IDatasetStore
{
    private const string TempMarker = ".incomplete-";

    public string Root { get; } = Path.GetFullPath(root);

    public string Describe(string path) => Full(path);

    public Task<bool> ExistsAsync(string path, CancellationToken ct) => Task.FromResult(File.Exists(Full(path)));

    public Task PutFileAsync(string localFile, string path, CancellationToken ct)
    {
        string target = Full(path);
        Directory.CreateDirectory(Path.GetDirectoryName(target)!);
        string temp = target + TempMarker + Guid.NewGuid().ToString("N");
        File.Move(localFile, temp);
        File.Move(temp, target, overwrite: true);
        return Task.CompletedTask;
    }

    public async Task PutTextAsync(string path, string text, CancellationToken ct)
    {
        string target = Full(path);
        Directory.CreateDirectory(Path.GetDirectoryName(target)!);
        string temp = target + TempMarker + Guid.NewGuid().ToString("N");
        await File.WriteAllTextAsync(temp, text, new UTF8Encoding(false), ct);
        File.Move(temp, target, overwrite: true);
    }

    public async Task<string?> ReadTextAsync(string path, CancellationToken ct)
    {
        string file = Full(path);
        return File.Exists(file) ? await File.ReadAllTextAsync(file, ct) : null;
    }

    public async Task<LocalCopy> GetVerifiedLocalFileAsync(string path, long bytes, string sha256, CancellationToken ct)
    {
        string file = Full(path);
        if (!File.Exists(file))
            throw new DataInputException(DataErrorKind.Corrupt, $"Shard {file} is missing; refusing to serve it.");
        await FileDigest.VerifyAsync(file, bytes, sha256, file, ct);
        return new LocalCopy(file, LocalCopyKind.InPlace);
    }

    public Task RemoveIncompleteAsync(string prefix, CancellationToken ct)
    {
        string folder = Full(prefix);
        if (Directory.Exists(folder))
            foreach (string f in Directory.EnumerateFiles(folder, "*" + TempMarker + "*"))
                File.Delete(f);
        return Task.CompletedTask;
    }

    private string Full(string path)
    {
        if (path.Contains("..", StringComparison.Ordinal) || Path.IsPathRooted(path))
            throw new ArgumentException($"Store path '{path}' must be relative and stay inside the store.", nameof(path));
        return Path.Combine(Root, path.Replace('/', Path.DirectorySeparatorChar));
    }
}
