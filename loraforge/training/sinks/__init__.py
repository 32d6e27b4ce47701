"""Metric sinks, one per module, each registered in `core.plugins.SINKS` under the name `--log`
gives it; a sink is `build(out, history)` with `log(row)` and `close()` (`training.metrics.MetricSink`)."""
