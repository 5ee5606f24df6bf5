// The corpus shipped in the repository (data/corpus/kjv.txt.gz, format in data/corpus/README.md):
// locating it, streaming its documents, and a deterministic train/validation split. Not a tokenizer.

namespace DeepSeekCluster.Text.Data;

public static class ShippedCorpus
{
    /// <summary>Where the file lives in the repository.</summary>
    public const string RepositoryPath = "data/corpus/kjv.txt.gz";

    /// <summary>Where Text.csproj copies it, relative to the binaries of every project that references Text (Training does).</summary>
    public const string OutputPath = "corpus/kjv.txt.gz";

    /// <summary>
    /// The corpus file: <paramref name="path"/> when given, else the copy next to the binaries,
    /// else the first <c>data/corpus/kjv.txt.gz</c> found walking up from the binaries.
    /// </summary>
    public static string Locate(string? path = null)
    {
        if (path is not null)
            return File.Exists(path) ? Path.GetFullPath(path)
                : throw new FileNotFoundException($"Corpus file '{path}' does not exist.", path);

        string beside = Path.Combine(AppContext.BaseDirectory, OutputPath);
        if (File.Exists(beside))
            return beside;

        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, RepositoryPath);
            if (File.Exists(candidate))
                return candidate;
        }
        throw new FileNotFoundException(
            $"The shipped corpus was not found: neither '{beside}' nor '{RepositoryPath}' in any folder above " +
            $"'{AppContext.BaseDirectory}'. Pass its path explicitly, or regenerate it with data/corpus/make-kjv.sh.");
    }

    /// <summary>Streams the documents (one per chapter, lines joined by '\n', no trailing newline).</summary>
    public static IEnumerable<string> Documents(string? path = null) => TextCorpus.Documents([Locate(path)]);

    /// <summary>
    /// Splits documents by a seeded hash of their text: a document's side depends only on its text
    /// and the seed, never on order or on the other documents, so no document (nor any exact
    /// duplicate of it) appears on both sides. The validation share is
    /// <paramref name="validationFraction"/> in expectation, not exactly.
    /// </summary>
    public static (IReadOnlyList<string> Train, IReadOnlyList<string> Validation) Split(
        IEnumerable<string> docs, double validationFraction, int seed)
    {
        if (!(validationFraction >= 0 && validationFraction <= 1))
            throw new ArgumentOutOfRangeException(nameof(validationFraction), validationFraction,
                "The validation fraction must be between 0 and 1.");

        var train = new List<string>();
        var validation = new List<string>();
        foreach (string doc in docs)
        {
            double u = StableHash.ToUnitInterval(StableHash.OfText(doc, unchecked((ulong)seed)));
            (u < validationFraction ? validation : train).Add(doc);
        }
        return (train, validation);
    }
}
