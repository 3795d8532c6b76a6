"""`fitclip serve INDEX`: a search page and a JSON API over an index built by `fitclip index`.

    GET /                          the page (plain HTML and JavaScript, no build step)
    GET /api/search?q=...&k=10     {"query", "k", "results": [{rank, id, path, score, duration,
                                   best_frames: [{frame, time, score}], thumb, video, thumb_w}]}
    GET /thumb/<id>, /video/<id>   a video's thumbnail strip and the video itself (range requests)

Only files named in the index are served, looked up by the index's own ids: no path from a request
ever reaches the file system. Bad input (empty or over-long query, k or rerank out of range) is a
400 with a message; an unknown id a 404; an index that cannot be read a 503 whose message says why
(the page shows it). Every response carries nosniff, no-referrer, frame denial and a content
security policy that allows only this origin (the page's own script and style by a per-response
nonce). At most --threads requests run at once and --queue more wait, each at most
--queue-timeout seconds; past that the answer is 503 with Retry-After. Binds to 127.0.0.1 unless
--host says otherwise; waitress (a production WSGI server, pure Python) serves it, Flask's
development server only with --debug.
"""
from __future__ import annotations

import argparse
import io
import mimetypes
import secrets
import sys
import threading

MAX_K = 200
MAX_QUERY_CHARS = 500
MAX_RERANK = 10000

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fitclip search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style nonce="__NONCE__">
 body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
 form { display: flex; gap: .5rem; margin-bottom: 1rem; }
 input[type=search] { flex: 1; font-size: 1.1rem; padding: .4rem .6rem; }
 #message { color: #a00; margin: .5rem 0; min-height: 1.2em; }
 .result { display: flex; gap: 1rem; padding: .8rem 0; border-top: 1px solid #ddd; align-items: flex-start; }
 .strip { position: relative; display: inline-block; line-height: 0; }
 .strip img { height: 64px; }
 .frame-hit { position: absolute; top: 0; height: 60px; border: 2px solid #f80; box-sizing: content-box; }
 .meta { font-size: .9rem; }
 .meta .path { font-weight: 600; word-break: break-all; }
 video { width: 16rem; height: 9rem; background: #000; object-fit: contain; flex: none; }
 #k { width: 5rem; }
</style></head>
<body>
<h1>fitclip search</h1>
<p id="about">__ABOUT__</p>
<form id="form"><input id="q" type="search" name="q" placeholder="what should the video show?" autofocus>
<input id="k" type="number" name="k" value="10" min="1" max="__MAXK__">
<button type="submit">Search</button></form>
<div id="message">__MESSAGE__</div>
<div id="results"></div>
<script nonce="__NONCE__">
const form = document.getElementById("form"), box = document.getElementById("results"),
      message = document.getElementById("message");
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const q = document.getElementById("q").value, k = document.getElementById("k").value;
  message.textContent = "searching...";
  box.replaceChildren();
  let body;
  try {
    const resp = await fetch(`/api/search?q=${encodeURIComponent(q)}&k=${encodeURIComponent(k)}`);
    body = await resp.json();
    if (!resp.ok) { message.textContent = body.error || `error ${resp.status}`; return; }
  } catch (err) { message.textContent = `the server did not answer (${err})`; return; }
  message.textContent = body.results.length ? "" : "no videos in the index";
  for (const r of body.results) {
    const row = el("div", {class: "result", "data-rank": r.rank});
    const strip = el("div", {class: "strip"});
    strip.appendChild(el("img", {src: r.thumb, alt: r.path}));
    for (const b of r.best_frames) {
      const hit = el("span", {class: "frame-hit", "data-frame": b.frame, title: `${b.time.toFixed(1)} s`});
      hit.style.left = `${b.frame * r.thumb_w}px`;  // (CSSOM, which the content security policy allows)
      hit.style.width = `${r.thumb_w - 4}px`;
      strip.appendChild(hit);
    }
    const best = r.best_frames[0];
    const video = el("video", {src: `${r.video}#t=${best ? best.time.toFixed(2) : 0}`, controls: "",
                               preload: "metadata"});
    const meta = el("div", {class: "meta"});
    meta.appendChild(el("div", {class: "path"}, `${r.rank}. ${r.path}`));
    meta.appendChild(el("div", {}, `score ${r.score.toFixed(4)}, ${r.duration.toFixed(1)} s`));
    meta.appendChild(el("div", {class: "times"},
      "best frames at " + r.best_frames.map(b => `${b.time.toFixed(1)} s`).join(", ")));
    meta.appendChild(strip);
    row.appendChild(video);
    row.appendChild(meta);
    box.appendChild(row);
  }
});
</script></body></html>
"""


def csp(nonce: str | None) -> str:
    """The content security policy: this origin only; inline script and style only with the
    page's nonce."""
    inline = f" 'nonce-{nonce}'" if nonce else ""
    return (f"default-src 'none'; script-src 'self'{inline}; style-src 'self'{inline}; img-src 'self'; "
            "media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class Admission:
    """WSGI middleware bounding the work in flight: `running` requests at once, `queue` more
    waiting at most `timeout` seconds each; any other request is answered 503 with Retry-After
    at once (the server stays responsive under overload instead of queueing without bound)."""

    def __init__(self, app, running: int, queue: int, timeout: float):
        self.app, self.timeout = app, timeout
        self.slots = threading.BoundedSemaphore(running)
        self.places = threading.BoundedSemaphore(running + queue)

    def __call__(self, environ, start_response):
        if not self.places.acquire(blocking=False):
            return self.busy(start_response, "the server is at capacity")
        try:
            if not self.slots.acquire(timeout=self.timeout):
                return self.busy(start_response, f"no worker was free within {self.timeout:g} s")
            try:
                # (the body is produced here, inside the slot: a video's bytes are small files)
                return list(self.app(environ, start_response))
            finally:
                self.slots.release()
        finally:
            self.places.release()

    @staticmethod
    def busy(start_response, why: str):
        body = ('{"error": "%s; try again shortly"}' % why).encode()
        start_response("503 Service Unavailable", [("Content-Type", "application/json"), ("Retry-After", "1"),
                                                   ("Content-Length", str(len(body))),
                                                   ("X-Content-Type-Options", "nosniff")])
        return [body]


def create_app(index_path, device: str = "cpu", searcher=None):
    """The Flask app over the index at `index_path` (or a ready `searcher`, fitclip_ext.search.Searcher)."""
    from flask import Flask, abort, jsonify, request, send_file

    from .search import BadIndex, Searcher, read_source

    app = Flask("fitclip_ext.serve")
    state = {"searcher": searcher, "error": None}
    if searcher is None:
        try:
            state["searcher"] = Searcher(index_path, device)
        except (BadIndex, FileNotFoundError, ValueError, RuntimeError) as err:
            state["error"] = f"the index at {index_path} cannot be used: {err}"
    ids = {}
    if state["searcher"] is not None:
        ids = {v["id"]: i for i, v in enumerate(state["searcher"].index.videos)}

    def page_text(s: str) -> str:
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    @app.get("/")
    def page():
        if state["error"]:
            about, message = "", page_text(state["error"])
        else:
            idx = state["searcher"].index
            about = page_text(f"{len(idx.videos)} videos in {idx.meta['video_dir']} ({idx.meta['model']}, "
                              f"{idx.meta['num_frames']} frames each)")
            message = ""
        nonce = secrets.token_urlsafe(16)
        html = (PAGE.replace("__ABOUT__", about).replace("__MESSAGE__", message).replace("__MAXK__", str(MAX_K))
                .replace("__NONCE__", nonce))
        return html, 200, {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": csp(nonce)}

    @app.after_request
    def security_headers(resp):
        resp.headers.setdefault("Content-Security-Policy", csp(None))
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["X-Frame-Options"] = "DENY"
        return resp

    def error(status: int, text: str):
        return jsonify({"error": text}), status

    @app.get("/api/search")
    def api_search():
        if state["error"]:
            return error(503, state["error"])
        q = request.args.get("q", "")
        if not q.strip():
            return error(400, "the query is empty: type what the video should show (parameter q)")
        if len(q) > MAX_QUERY_CHARS:
            return error(400, f"the query has {len(q)} characters; at most {MAX_QUERY_CHARS} are read")
        raw_k = request.args.get("k", "10")
        try:
            k = int(raw_k)
        except ValueError:
            return error(400, f"k must be an integer in [1, {MAX_K}], got {raw_k!r}")
        if not 1 <= k <= MAX_K:
            return error(400, f"k must be an integer in [1, {MAX_K}], got {k}")
        raw_r = request.args.get("rerank", "0")
        try:
            rerank = int(raw_r)
        except ValueError:
            return error(400, f"rerank must be an integer in [0, {MAX_RERANK}], got {raw_r!r}")
        if not 0 <= rerank <= MAX_RERANK:
            return error(400, f"rerank must be an integer in [0, {MAX_RERANK}], got {rerank}")
        try:
            results = state["searcher"].query(q, k, rerank)
        except ValueError as err:
            return error(400, str(err))
        idx = state["searcher"].index
        for r in results:
            r.update(thumb=f"/thumb/{r['id']}", video=f"/video/{r['id']}", thumb_w=idx.videos[ids[r["id"]]]["thumb_w"])
        return jsonify({"query": q, "k": k, "results": results})

    def lookup(video_id: str) -> int:
        if state["error"] or video_id not in ids:
            abort(404, description="no such video in the index")
        return ids[video_id]

    @app.get("/thumb/<video_id>")
    def thumb(video_id):
        path = state["searcher"].index.thumb_file(lookup(video_id))
        if not path.is_file():
            abort(404, description="the thumbnail is missing: re-run fitclip index")
        return send_file(path, mimetype="image/jpeg", max_age=3600)

    @app.get("/video/<video_id>")
    def video(video_id):
        source = state["searcher"].index.video_source(lookup(video_id))
        path = source[0] if isinstance(source, tuple) else source
        if not path.is_file():
            abort(404, description="the video has moved or was deleted since indexing: re-run fitclip index")
        if not isinstance(source, tuple):
            return send_file(path, conditional=True)
        data = read_source(source)  # (a video inside a shard: its bytes)
        if len(data) != source[2]:
            abort(404, description="the shard changed since indexing: re-run fitclip index")
        name = state["searcher"].index.videos[ids[video_id]]["path"].rsplit(":", 1)[1]
        return send_file(io.BytesIO(data), mimetype=mimetypes.guess_type(name)[0] or "video/mp4", conditional=True,
                         download_name=name, etag=video_id)

    @app.errorhandler(404)
    def not_found(err):
        return error(404, getattr(err, "description", "not found"))

    return app


def main(argv=None):
    p = argparse.ArgumentParser(prog="fitclip serve", description="a search page and JSON API over a fitclip index")
    p.add_argument("index", help="index folder built by `fitclip index`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' for the text encoder")
    p.add_argument("--threads", type=int, default=4, help="requests served at once (default: %(default)s)")
    p.add_argument("--queue", type=int, default=32, help="requests waiting beyond those; more are answered 503 with "
                   "Retry-After (default: %(default)s)")
    p.add_argument("--queue-timeout", type=float, default=10.0, help="seconds a request may wait for a free worker "
                   "before a 503 (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="Flask's development server (reloading, tracebacks) "
                   "instead of waitress: for working on the page only")
    a = p.parse_args(argv)
    from .errors import InputError

    for flag, value in (("--threads", a.threads), ("--queue", a.queue + 1), ("--queue-timeout", a.queue_timeout)):
        if value <= 0:
            raise InputError(f"{flag} must be positive, got {getattr(a, flag[2:].replace('-', '_'))}")
    from .search import BadIndex, Searcher

    try:
        searcher = Searcher(a.index, a.device)
    except (BadIndex, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"fitclip serve: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    app = create_app(a.index, searcher=searcher)
    print(f"fitclip serve: {len(searcher.index.videos)} videos; open http://{a.host}:{a.port}/", file=sys.stderr)
    if a.debug:
        app.run(host=a.host, port=a.port, threaded=True)
        return
    import waitress

    wsgi, options = server_args(app, a.threads, a.queue, a.queue_timeout)
    waitress.serve(wsgi, host=a.host, port=a.port, ident="fitclip", **options)


def server_args(app, threads: int, queue: int, queue_timeout: float, spare: int = 4):
    """(the WSGI app with admission control, waitress's keywords): waitress gets a thread for each
    running and each waiting request, plus `spare` ones that answer 503 at once when those are all
    taken (so an overloaded server still answers), and a bound on open connections."""
    return (Admission(app, threads, queue, queue_timeout),
            dict(threads=threads + queue + spare, connection_limit=threads + queue + 64, channel_timeout=30))
