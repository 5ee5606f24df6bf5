// The nccl backend's binding against the real NCCL: Debian's libnccl2 and its nccl.h, fetched by .ci/fetch-nccl.
// Without a GPU NCCL cannot form a communicator, but its header is the independent statement of every signature and
// constant the P/Invoke declarations must match, and its library loads, reports its version and runs its bootstrap.
using System.Reflection;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;
using DeepSeekCluster.Training.Collectives.Nccl;
using DeepSeekCluster.Training.Tests.Engine;

namespace DeepSeekCluster.Training.Tests.Collectives;

public class NcclLibraryTests
{
    /// <summary>The folder .ci/fetch-nccl fills: sysroot/ (libnccl2, libnccl-dev, glibc) and dotnet/ (a host on that glibc).</summary>
    static string Root
    {
        get
        {
            var root = Environment.GetEnvironmentVariable("DEEPSEEK_NCCL_ROOT")
                       ?? Path.Combine(Environment.GetEnvironmentVariable("XDG_CACHE_HOME") ?? Path.Combine(Environment.GetEnvironmentVariable("HOME")!, ".cache"), "deepseekcluster", "nccl");
            if (!File.Exists(Path.Combine(root, "ready")))
                throw new InvalidOperationException($"no NCCL in {root}: these tests use Debian's libnccl2 and nccl.h, which .ci/fetch-nccl downloads (.ci/run runs it)");
            return root;
        }
    }

    static string Lib => Path.Combine(Root, "sysroot", "usr", "lib", "x86_64-linux-gnu");

    static string Header => Regex.Replace(Regex.Replace(File.ReadAllText(Path.Combine(Root, "sysroot", "usr", "include", "nccl.h")), @"/\*.*?\*/", " ", RegexOptions.Singleline), "//[^\n]*", " ");

    static int Define(string header, string name) => int.Parse(Regex.Match(header, $@"#define\s+{name}\s+(\d+)\b").Groups[1].Value);

    static int EnumValue(string header, string name)
    {
        var m = Regex.Match(header, $@"\b{name}\s*=\s*(\d+)");
        Assert.True(m.Success, $"nccl.h has no enumerator {name}");
        return int.Parse(m.Groups[1].Value);
    }

    [Fact]
    public void EveryConstantOfTheBindingIsNcclHsValue()
    {
        var h = Header; // each pair: the binding's constant, then nccl.h's
        Assert.Equal(NcclNative.UniqueIdBytes, Define(h, "NCCL_UNIQUE_ID_BYTES"));
        Assert.Equal(NcclNative.UniqueIdBytes, Marshal.SizeOf<NcclNative.UniqueId>());
        Assert.Equal(NcclNative.Success, EnumValue(h, "ncclSuccess"));
        Assert.Equal(NcclNative.InProgress, EnumValue(h, "ncclInProgress"));
        Assert.Equal(NcclNative.Int64, EnumValue(h, "ncclInt64"));
        Assert.Equal(NcclNative.Float16, EnumValue(h, "ncclFloat16"));
        Assert.Equal(NcclNative.Float32, EnumValue(h, "ncclFloat32"));
        Assert.Equal(NcclNative.Float64, EnumValue(h, "ncclFloat64"));
        Assert.Equal(NcclNative.BFloat16, EnumValue(h, "ncclBfloat16"));
        Assert.Equal(NcclNative.Sum, EnumValue(h, "ncclSum"));
        Assert.Equal(NcclNative.Max, EnumValue(h, "ncclMax"));
        Assert.Equal(NcclNative.Avg, EnumValue(h, "ncclAvg"));
        // The version decoding against the header's own three parts.
        Assert.Equal($"{Define(h, "NCCL_MAJOR")}.{Define(h, "NCCL_MINOR")}.{Define(h, "NCCL_PATCH")}", NcclNative.VersionText(Define(h, "NCCL_VERSION_CODE")));
        Assert.Equal("2.7.8", NcclNative.VersionText(2708)); // the scheme before 2.9: major*1000 + minor*100 + patch
    }

    [Fact]
    public void EveryDeclaredFunctionHasNcclHsSignature()
    {
        var h = Header;
        var prototypes = Regex.Matches(h, @"(?<ret>\bncclResult_t|\bconst\s+char\s*\*)\s*\b(?<name>nccl\w+)\s*\((?<params>[^)]*)\)\s*;")
            .ToDictionary(m => m.Groups["name"].Value, m => (ret: m.Groups["ret"].Value, parameters: m.Groups["params"].Value));
        var methods = typeof(NcclNative).GetMethods(BindingFlags.Static | BindingFlags.Public | BindingFlags.NonPublic)
            .Where(m => m.GetCustomAttribute<DllImportAttribute>()?.Value == NcclNative.Library).ToList();
        Assert.Equal(NcclNative.EntryPoints.Order(), methods.Select(m => m.Name).Order());
        Assert.True(methods.Count >= 15, $"only {methods.Count} libnccl functions found by reflection");
        foreach (var method in methods)
        {
            Assert.True(prototypes.TryGetValue(method.Name, out var c), $"nccl.h declares no {method.Name}");
            Assert.Equal(c.ret.StartsWith("const", StringComparison.Ordinal) ? typeof(IntPtr) : typeof(int), method.ReturnType);
            var cParams = c.parameters.Trim() is "" or "void" ? [] : c.parameters.Split(',').Select(p => p.Trim()).ToArray();
            var clr = method.GetParameters();
            Assert.True(cParams.Length == clr.Length, $"{method.Name}: nccl.h has {cParams.Length} parameters ({c.parameters}), the binding {clr.Length}");
            for (int i = 0; i < clr.Length; i++)
            {
                var (type, byRef) = Expected(cParams[i]);
                Assert.True(clr[i].ParameterType.IsByRef == byRef && (byRef ? clr[i].ParameterType.GetElementType() : clr[i].ParameterType) == type,
                            $"{method.Name} parameter {i} '{cParams[i]}' should be {(byRef ? "out " : "")}{type.Name}, is {clr[i].ParameterType}");
            }
        }
    }

    /// <summary>The CLR type a C parameter declaration marshals as: pointers to data are IntPtr, pointers to one result are out parameters.</summary>
    static (Type type, bool byRef) Expected(string declaration)
    {
        var type = Regex.Replace(declaration, @"\s*\b\w+$", "").Replace("const ", "").Replace(" ", "");
        if (type.EndsWith('*'))
        {
            var pointee = type[..^1];
            return pointee == "void" ? (typeof(IntPtr), false) : (Scalar(pointee), true);
        }
        return (Scalar(type), false);
    }

    static Type Scalar(string c) => c switch
    {
        "int" or "ncclResult_t" or "ncclDataType_t" or "ncclRedOp_t" => typeof(int),
        "size_t" => typeof(nuint),
        "ncclComm_t" or "cudaStream_t" => typeof(IntPtr),
        "ncclUniqueId" => typeof(NcclNative.UniqueId),
        _ => throw new InvalidOperationException($"no CLR mapping for the C type '{c}'"),
    };

    [Fact]
    public void CheckLoadsTheRealLibncclReadsItsVersionFindsEveryEntryPointAndHasNcclSayWhyItFormsNoCommunicatorWithoutAVisibleGpu()
    {
        var h = Header;
        var host = Path.Combine(Root, "dotnet", "dotnet");
        // Every GPU hidden, so a GPU machine runs the same path as a CPU one: NCCL's CUDA setup fails and says why.
        var (code, stdout, stderr) = GpuWorkerCliTests.RunWith(host, new Dictionary<string, string> { ["LD_LIBRARY_PATH"] = Lib, ["CUDA_VISIBLE_DEVICES"] = "" }, "check");
        Assert.True(code == 0, stderr + stdout);
        int required = NcclNative.EntryPoints.Count(e => !NcclNative.OptionalEntryPoints.Contains(e));
        var version = $"{Define(h, "NCCL_MAJOR")}.{Define(h, "NCCL_MINOR")}.{Define(h, "NCCL_PATCH")}";
        Assert.Contains($"NCCL         {version} from {Path.Combine(Lib, "libnccl.so.2")}; {required} of {required} entry points the nccl backend calls", stdout);
        Assert.Contains("unique id    created (128 bytes): the bootstrap works", stdout);
        // ncclCommInitRank reached NCCL's CUDA setup, and its failure comes with ncclGetLastError's detail after the result's name.
        Assert.Matches(@"communicator NCCL cannot form one here: unhandled cuda error \(run with NCCL_DEBUG=INFO for details\): Cuda failure '[^']+'", stdout);
        Assert.Contains("collectives  tcp", stdout); // no GPU: the worker still trains with the tcp backend
        Assert.EndsWith("ok: this machine can train on cpu with the tcp backend", stdout.TrimEnd());
    }

    [Fact]
    public void CheckNamesWhatAnOldOrIncompleteLibncclLacks()
    {
        var dir = Directory.CreateTempSubdirectory("fake-nccl-").FullName;
        try
        {
            // Too old: every entry point, but ncclGetVersion says 2.7.8 (before ncclAvg and bfloat16).
            var old = Path.Combine(dir, "old");
            Compile(old, string.Join("\n", NcclNative.EntryPoints.Select(e => e == "ncclGetVersion"
                ? "int ncclGetVersion(int* v) { *v = 2708; return 0; }"
                : e == "ncclGetErrorString" || e == "ncclGetLastError" ? $"const char* {e}(void) {{ return \"\"; }}" : $"int {e}(void) {{ return 0; }}")));
            var (code, stdout, stderr) = GpuWorkerCliTests.RunWith("dotnet", new Dictionary<string, string> { ["LD_LIBRARY_PATH"] = old }, "check", "--device", "cpu");
            Assert.True(code == 0, stderr + stdout); // a CPU worker does not need NCCL
            Assert.Contains($"{Path.Combine(old, "libnccl.so.2")} is NCCL 2.7.8; the nccl backend needs 2.10.0 or newer (ncclAvg, bfloat16)", stdout);
            Assert.DoesNotContain("unique id", stdout);

            // Incomplete: only ncclGetVersion.
            var partial = Path.Combine(dir, "partial");
            Compile(partial, "int ncclGetVersion(int* v) { *v = 21903; return 0; }");
            (code, stdout, stderr) = GpuWorkerCliTests.RunWith("dotnet", new Dictionary<string, string> { ["LD_LIBRARY_PATH"] = partial }, "check");
            Assert.True(code == 0, stderr + stdout);
            var missing = NcclNative.EntryPoints.Where(e => e != "ncclGetVersion" && !NcclNative.OptionalEntryPoints.Contains(e)).Order();
            Assert.Contains($"NCCL         2.19.3 from {Path.Combine(partial, "libnccl.so.2")}; 1 of {missing.Count() + 1} entry points", stdout);
            Assert.Contains($"lacks {string.Join(", ", missing)}, which the nccl backend calls: install NCCL 2.10.0 or newer", stdout);
        }
        finally { Directory.Delete(dir, true); }
    }

    static void Compile(string folder, string source)
    {
        Directory.CreateDirectory(folder);
        File.WriteAllText(Path.Combine(folder, "fake.c"), source);
        var psi = new System.Diagnostics.ProcessStartInfo("cc") { RedirectStandardError = true, WorkingDirectory = folder };
        foreach (var a in new[] { "-shared", "-fPIC", "-o", "libnccl.so.2", "fake.c" }) psi.ArgumentList.Add(a);
        using var cc = System.Diagnostics.Process.Start(psi)!;
        var errors = cc.StandardError.ReadToEnd();
        cc.WaitForExit();
        Assert.True(cc.ExitCode == 0, $"cc failed: {errors}");
    }
}
