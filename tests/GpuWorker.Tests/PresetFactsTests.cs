// The facts about the model presets that Contracts keeps (it cannot reference Training) equal Training's presets.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Training.Model;

namespace DeepSeekCluster.GpuWorker.Tests;

public class PresetFactsTests
{
    [Fact]
    public void EveryPresetsRoutedExpertsInTheSpecValidationAreTheModelsOwn()
    {
        Assert.Equal(JobSpec.ModelPresets.Order(), JobSpec.PresetRoutedExperts.Keys.Order());
        foreach (var name in JobSpec.ModelPresets)
            Assert.True(JobSpec.PresetRoutedExperts[name] == DeepSeekConfig.Preset(name).NRoutedExperts,
                $"preset {name}: JobSpec.PresetRoutedExperts says {JobSpec.PresetRoutedExperts[name]}, DeepSeekConfig.Preset says {DeepSeekConfig.Preset(name).NRoutedExperts}");
    }
}
