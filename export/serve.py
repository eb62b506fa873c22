"""Serves the browser demo page with an exported model, from this machine only (127.0.0.1 by default).

``flora serve --model exports/student_tfjs [--port 8000]`` then open the printed address.
One static server, four mounts:
``/`` -> ``export/web/`` (the page), ``/model/`` -> the export folder (model.json, weight shards,
labels.json, preprocess.json), ``/vendor/tfjs/`` and ``/vendor/tfjs-backend-wasm/`` -> the ``dist``
folders of the project's own npm packages (``make js-deps``): no CDN, so the page works offline.
``.wasm`` is served as ``application/wasm`` (streaming compilation needs it).

``--bundle OUT`` writes the same site as plain files instead (the page, the four TF.js files it
loads, the export under ``model/``), for any static host.

Leaves out: the page itself (``export/web/``) and producing the export (tfjs.py).
"""

from __future__ import annotations

import shutil
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from flora.errors import ArgumentParser, fail

HERE = Path(__file__).resolve().parent
WEB = HERE / "web"
NODE = HERE / "js" / "node_modules" / "@tensorflow"


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".wasm": "application/wasm",
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".json": "application/json",
        ".bin": "application/octet-stream",
    }

    def __init__(self, *args, mounts: dict[str, Path], **kwargs):
        self.mounts = mounts
        super().__init__(*args, directory=str(WEB), **kwargs)

    def translate_path(self, path: str) -> str:
        rel = unquote(urlsplit(path).path)
        for prefix, root in self.mounts.items():
            if rel.startswith(prefix):
                target = (root / rel[len(prefix) :]).resolve()
                return str(target) if target.is_relative_to(root.resolve()) else str(root / "__outside__")
        return super().translate_path(path)

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        # Cross-origin isolation: lets the page use SharedArrayBuffer, so TF.js loads its threaded
        # wasm build and picks a thread count from the machine's cores (1 on this 2-core machine,
        # so no multi-thread figure was measured here).
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, format, *args):  # quiet: the demo prints its own address
        pass


class DemoServer(ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True


VENDOR_FILES = {
    "tfjs": ["tf.min.js"],
    "tfjs-backend-wasm": [
        "tf-backend-wasm.min.js",
        "tfjs-backend-wasm.wasm",
        "tfjs-backend-wasm-simd.wasm",
        "tfjs-backend-wasm-threaded-simd.wasm",
    ],
}


def missing_vendor() -> str | None:
    for package in VENDOR_FILES:
        if not (NODE / package / "dist").is_dir():
            return f"@tensorflow/{package} is not installed under {HERE / 'js'}: run `make js-deps`"
    return None


def _check_sources(model_dir: Path) -> None:
    """The export and the npm packages the page loads are there, or FileNotFoundError saying what to run."""
    if not (model_dir / "model.json").is_file():
        raise FileNotFoundError(f"{model_dir}/model.json not found: run `flora export tfjs` first")
    problem = missing_vendor()
    if problem:
        raise FileNotFoundError(problem)


def make_server(model_dir: str | Path, host: str = "127.0.0.1", port: int = 0) -> DemoServer:
    """A server (not yet serving) for the page and ``model_dir``; port 0 picks a free one."""
    model_dir = Path(model_dir)
    _check_sources(model_dir)
    mounts = {"/model/": model_dir, **{f"/vendor/{p}/": NODE / p / "dist" for p in VENDOR_FILES}}
    return DemoServer((host, port), partial(_Handler, mounts=mounts))


def write_bundle(model_dir: str | Path, out: str | Path) -> Path:
    """The demo site as static files in ``out``: page, TF.js files, and the export under ``model/``."""
    model_dir, out = Path(model_dir), Path(out)
    _check_sources(model_dir)
    if out.resolve() == model_dir.resolve() or model_dir.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"--bundle {out} must not contain the export {model_dir}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(WEB, out)
    for package, names in VENDOR_FILES.items():
        (out / "vendor" / package).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(NODE / package / "dist" / name, out / "vendor" / package / name)
    shutil.copytree(model_dir, out / "model", ignore=shutil.ignore_patterns("report.json"))
    return out


def serve_in_thread(model_dir: str | Path, host: str = "127.0.0.1") -> tuple[DemoServer, str]:
    """Starts the server on a free port in a daemon thread; returns it and the page's URL."""
    server = make_server(model_dir, host, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = ArgumentParser(prog=prog or "flora serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a TF.js export (the --out of flora export tfjs)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--bundle", help="write the site as static files into this folder instead of serving")
    args = parser.parse_args(argv)
    if args.bundle:
        try:
            out = write_bundle(args.model, args.bundle)
        except (FileNotFoundError, ValueError) as exc:
            return fail("serve", exc)
        print(f"static site in {out}: serve it with any web server (.wasm as application/wasm)")
        return 0
    try:
        server = make_server(args.model, args.host, args.port)
    except (FileNotFoundError, OSError) as exc:
        return fail("serve", exc)
    print(f"Flora demo page: http://{args.host}:{server.server_address[1]}/  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
