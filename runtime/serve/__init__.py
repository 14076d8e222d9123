"""`facellava serve`: an OpenAI-compatible HTTP server over the runtime (FastAPI + uvicorn, the `serve` extra).

`cli.py` holds the command (light: nothing heavy imported at module level), `app.py` the application, `api.py`
the request format, `media.py` how a request's image or video is fetched and checked, `metrics.py` `/metrics`,
and `static/` the page served at `/` when it holds an `index.html`.
"""
