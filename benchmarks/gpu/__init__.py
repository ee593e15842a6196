"""The GPU bring-up kit: ``benchmarks/gpu/run.sh`` and the plugin's IPluginV3 driver (``python -m benchmarks.gpu.plugin_driver``)."""
