"""The GPU bring-up kit: ``benchmarks/gpu/run.sh`` and the IPluginV3 driver of the plugin
(``python -m benchmarks.gpu.plugin_driver``)."""
