"""A self-contained HTML browser of every head: `outdir/browser/index.html`.

`build_browser(inputs)` is the pure renderer, `render_to(outdir)` the stage entry.
"""

from head_explain.browser.build import build_browser, render_to, write_browser
from head_explain.browser.inputs import load_inputs

__all__ = ["build_browser", "load_inputs", "render_to", "write_browser"]
