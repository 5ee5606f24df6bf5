// A Linux network namespace joined to the host by a veth pair: a worker started inside it reaches the services at the
// host end's address, and taking the host end down cuts it off (its TCP connections stall, as on a real partition).
using System.Diagnostics;

namespace DeepSeekCluster.Chaos;

public sealed class NetworkNamespace : IDisposable
{
    public string Name { get; }
    /// <summary>The host end's address: what a process inside the namespace dials to reach the host's services.</summary>
    public string HostAddress { get; }
    /// <summary>The namespace end's address: where peers reach a process inside it.</summary>
    public string InnerAddress { get; }
    readonly string hostLink, innerLink;
    bool disposed;

    NetworkNamespace(string name, string hostLink, string innerLink, string hostAddress, string innerAddress)
    {
        Name = name; this.hostLink = hostLink; this.innerLink = innerLink; HostAddress = hostAddress; InnerAddress = innerAddress;
    }

    /// <summary>Creates the namespace and the veth pair on a /24 of 10.213.x.0 picked at random (so parallel runs differ).</summary>
    public static NetworkNamespace Create()
    {
        var tag = Convert.ToHexStringLower(System.Security.Cryptography.RandomNumberGenerator.GetBytes(3));
        int subnet = System.Security.Cryptography.RandomNumberGenerator.GetInt32(1, 255);
        // veth names are at most 15 characters.
        var ns = new NetworkNamespace($"dsc-chaos-{tag}", $"dsch{tag}", $"dscn{tag}", $"10.213.{subnet}.1", $"10.213.{subnet}.2");
        try
        {
            Ip($"netns add {ns.Name}");
            Ip($"link add {ns.hostLink} type veth peer name {ns.innerLink}");
            Ip($"link set {ns.innerLink} netns {ns.Name}");
            Ip($"addr add {ns.HostAddress}/24 dev {ns.hostLink}");
            Ip($"link set {ns.hostLink} up");
            Ip($"netns exec {ns.Name} ip addr add {ns.InnerAddress}/24 dev {ns.innerLink}");
            Ip($"netns exec {ns.Name} ip link set {ns.innerLink} up");
            Ip($"netns exec {ns.Name} ip link set lo up");
        }
        catch
        {
            ns.Dispose();
            throw;
        }
        return ns;
    }

    /// <summary>Cuts the namespace off: the host end goes down, packets to and from it are dropped.</summary>
    public void Cut() => Ip($"link set {hostLink} down");

    /// <summary>Reconnects: the host end comes up again and the kernel restores its route.</summary>
    public void Reconnect() => Ip($"link set {hostLink} up");

    /// <summary>The command line prefix that runs a program inside the namespace (ip execs it: the pid is the program's).</summary>
    public string[] ExecPrefix => ["netns", "exec", Name];

    public void Dispose()
    {
        if (disposed) return;
        disposed = true;
        // Deleting the host end deletes its peer; deleting the namespace frees the name. Both tolerate "already gone".
        TryIp($"link del {hostLink}");
        TryIp($"netns del {Name}");
    }

    static void Ip(string args)
    {
        var (code, output) = Run(args);
        if (code != 0) throw new InvalidOperationException($"'ip {args}' failed with code {code}: {output.Trim()} (network namespaces need root or CAP_NET_ADMIN)");
    }

    static void TryIp(string args) => Run(args);

    static (int code, string output) Run(string args)
    {
        var psi = new ProcessStartInfo("ip") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args.Split(' ')) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi) ?? throw new InvalidOperationException("could not start 'ip' (iproute2)");
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, stdout.Result + stderr);
    }

    /// <summary>Whether this machine lets us create namespaces (root, iproute2 present): checked once by creating one.</summary>
    public static string? Unavailable()
    {
        try { using var probe = Create(); return null; }
        catch (Exception e) when (e is InvalidOperationException or System.ComponentModel.Win32Exception) { return e.Message; }
    }
}
