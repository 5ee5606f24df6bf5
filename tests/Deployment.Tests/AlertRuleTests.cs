// The alerting rules (k8s/prometheus/rules.yaml): Prometheus's own promtool accepts them and fires each where it should
// on synthetic series (promtool test rules), and every metric they read is in docs/metrics.md.
using System.Diagnostics;
using YamlDotNet.RepresentationModel;

namespace DeepSeekCluster.Deployment.Tests;

public class AlertRuleTests
{
    static PrometheusRule Rules => Build.Of("k8s/prometheus").All<PrometheusRule>().Single();

    /// <summary>What an operator must hear about (issue 23), as alert → a metric its expression must read.</summary>
    static readonly Dictionary<string, string> Required = new()
    {
        ["DeepSeekWorkerHeartbeatLate"] = "deepseek_cluster_heartbeat_age_seconds",
        ["DeepSeekCheckpointCommitsNotCommitted"] = "deepseek_cluster_checkpoint_commits_total",
        ["DeepSeekJobStuckRescaling"] = "deepseek_cluster_jobs",
        ["DeepSeekNoTrainingStep"] = "deepseek_train_steps_total",
        ["DeepSeekAuthRefusals"] = "deepseek_data_auth_refusals_total",
    };

    [Fact]
    public void EveryRuleReadsOnlyCataloguedMetricsAndTheNeededAlertsExist()
    {
        var rules = Rules.Spec.Groups.SelectMany(g => g.Rules).ToList();
        foreach (var rule in rules)
        {
            var unknown = PromQl.MetricNames(rule.Expr).Where(n => !MetricsCatalogue.SeriesNames.Contains(n)).ToList();
            Assert.True(unknown.Count == 0, $"{rule.Alert}: reads {string.Join(", ", unknown)}, which docs/metrics.md does not list");
        }
        foreach (var (alert, metric) in Required)
        {
            var rule = rules.SingleOrDefault(r => r.Alert == alert);
            Assert.True(rule is not null, $"no alert {alert}");
            Assert.Contains(metric, PromQl.MetricNames(rule!.Expr));
        }
    }

    [Fact]
    public void PromtoolAcceptsTheRulesAndTheyFireOnTheirConditions()
    {
        string folder = Directory.CreateTempSubdirectory("rules-").FullName;
        string rulesFile = Path.Combine(folder, "rules.yaml");
        // The PrometheusRule's spec is a plain rule file.
        var source = new YamlStream();
        source.Load(new StringReader(Repository.Read("k8s", "prometheus", "rules.yaml")));
        var spec = ((YamlMappingNode)source.Documents.Single().RootNode)["spec"];
        using (var writer = new StreamWriter(rulesFile)) new YamlStream(new YamlDocument(spec)).Save(writer, assignAnchors: false);
        Promtool("check", "rules", rulesFile);

        string testFile = Path.Combine(folder, "rules-test.yaml");
        File.WriteAllText(testFile, """
            rule_files: [rules.yaml]
            evaluation_interval: 1m
            tests:
              - interval: 1m
                input_series:
                  - series: 'deepseek_cluster_jobs{state="rescaling"}'
                    values: '0 1x20'
                  - series: 'deepseek_cluster_jobs{state="running"}'
                    values: '1x30'
                  - series: 'deepseek_train_steps_total{worker="w0",training_job="j"}'
                    values: '0 1 2 3 3x30'
                  - series: 'deepseek_data_auth_refusals_total{surface="grpc",reason="missing"}'
                    values: '0x5 1x10'
                  - series: 'deepseek_coordinator_auth_refusals_total{surface="grpc",reason="missing"}'
                    values: '0x20'
                  - series: 'deepseek_checkpoint_store_auth_refusals_total{surface="grpc",reason="missing"}'
                    values: '0x20'
                  - series: 'deepseek_cluster_checkpoint_commits_total{outcome="failed"}'
                    values: '0x5 1x10'
                  - series: 'deepseek_cluster_heartbeat_age_seconds{worker="w1"}'
                    values: '1 40x10'
                alert_rule_test:
                  - eval_time: 5m
                    alertname: DeepSeekJobStuckRescaling
                    exp_alerts: []
                  - eval_time: 15m
                    alertname: DeepSeekJobStuckRescaling
                    exp_alerts:
                      - exp_labels: { severity: warning }
                        exp_annotations: { summary: "A job has been re-forming its worker set for 10 minutes" }
                  - eval_time: 25m
                    alertname: DeepSeekNoTrainingStep
                    exp_alerts:
                      - exp_labels: { severity: critical }
                        exp_annotations: { summary: "Jobs are running but no worker completed a step in 15 minutes" }
                  - eval_time: 8m
                    alertname: DeepSeekCheckpointCommitsNotCommitted
                    exp_alerts:
                      - exp_labels: { severity: critical, outcome: failed }
                        exp_annotations: { summary: "Checkpoints reported by every rank were not committed (failed) in the last 15 minutes" }
                  - eval_time: 4m
                    alertname: DeepSeekWorkerHeartbeatLate
                    exp_alerts:
                      - exp_labels: { severity: warning, worker: w1 }
                        exp_annotations: { summary: "Worker w1 has not been heard from for 40s" }
            """);
        Promtool("test", "rules", testFile);
    }

    static void Promtool(params string[] args)
    {
        var info = new ProcessStartInfo("promtool") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) info.ArgumentList.Add(a);
        Process process;
        try { process = Process.Start(info)!; }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException("promtool is not installed (it ships with Prometheus; Debian: apt-get install prometheus)", e);
        }
        using (process)
        {
            var output = process.StandardOutput.ReadToEndAsync();
            var errors = process.StandardError.ReadToEndAsync();
            Assert.True(process.WaitForExit(60_000), "promtool ran over 60 s");
            Assert.True(process.ExitCode == 0, $"promtool {string.Join(' ', args)} failed:\n{output.Result}\n{errors.Result}");
        }
    }
}
