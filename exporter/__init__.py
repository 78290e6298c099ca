"""pcee.exporter: a trained multi-exit model -> a verified bundle of per-layer graphs.

Entry points: `pcee.exporter.bundle.export_bundle` (what `pcee-export` runs, with the
`pcee.exporter.options.ExportOptions` it takes) and
`pcee.exporter.graph_export.export_full_graph` (one whole-model graph, for benchmarks). This package
imports nothing itself, so `pcee-export --help` starts without loading torch.
"""
