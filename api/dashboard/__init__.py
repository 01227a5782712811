"""The web dashboard at /ui: server-rendered pages whose scripts call the REST API (/v1) with the user's key.

The pages carry no data and need no session: each page's module script reads the API key from the tab's
sessionStorage and calls the same /v1 routes as `nwc remote` (one code path, one auth path). Static files and
the vendored Plotly.js (from the `plotly` package) are served from here, so nothing is fetched from the internet.
"""

from api.dashboard.routes import install

__all__ = ["install"]
