"""``equiray demo``: every stage at demo scale on one machine, chained by their typed results, ending in a
report (``chain``: the run; ``config``: the demo's defaults; ``report``: the Markdown report; ``serving``: the
serve stage's real HTTP requests)."""
from equiray_pipelines.demo.chain import run
from equiray_pipelines.demo.results import DemoResult, NFNStageResult
from equiray_pipelines.demo.config import STAGES, DemoConfig, NFNDemo
from equiray_pipelines.demo.serving import ServeStageResult, serve_stage

__all__ = ["DemoConfig", "DemoResult", "NFNDemo", "NFNStageResult", "STAGES", "ServeStageResult", "run",
           "serve_stage"]
