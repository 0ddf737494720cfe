"""Request traces: kvscale's format, importers of published traces, statistics, transforms, prompt expansion."""

from kvscale.traces.format import TraceFormatError, TraceRequest, load_trace, save_trace
from kvscale.traces.importers import IMPORTERS, import_trace
from kvscale.traces.prompts import TOKEN_ID_HIGH, TOKEN_ID_LOW, BlockPrompt, PrefixBlocks
from kvscale.traces.stats import prefix_reuse, trace_stats
from kvscale.traces.transform import rate_scale, resize, speed, window

__all__ = ["IMPORTERS", "TOKEN_ID_HIGH", "TOKEN_ID_LOW", "BlockPrompt", "PrefixBlocks", "TraceFormatError",
           "TraceRequest", "import_trace", "load_trace", "prefix_reuse", "rate_scale", "resize", "save_trace", "speed",
           "trace_stats", "window"]  # fmt: skip
