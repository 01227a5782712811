"""The web dashboard (/ui, api/dashboard/).

    fast:    every page and static file is served with its content type; / redirects to /ui/; the vendored
             Plotly.js comes from the plotly package; ModelDetail.parameter_count (the new-job page's size
             prediction) is read from the safetensors headers
    browser: real headless Chromium (Debian `chromium`, Playwright) against a real `nwc serve` process (API +
             local worker on SQLite): sign in → upload the 3-block SmolLM2 (multipart) → start an NWC job →
             progress advances on the jobs list → finished job: plots, per-layer table, evaluation → download
             the bundle and check its sha256; a bad key and a failed job show their messages; phone width.
             Screenshots of each page go to docs/screenshots/ (linked from README.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import ApiServer, start_server, tiny_model_files
from fake_hub import FakeHub, repo_of_dir
from services import (  # noqa: F401  (pytest fixtures)
    PostgresServer,
    S3Config,
    postgres_server,
    redis_url,
    s3_config,
    wait_ready,
)

ROOT = Path(__file__).resolve().parents[1]
# The README links the screenshots of the last run here; NWC_SCREENSHOTS_DIR sends them elsewhere.
SHOTS = Path(os.environ.get("NWC_SCREENSHOTS_DIR") or ROOT / "docs" / "screenshots")
CHROMIUM = os.environ.get("NWC_CHROMIUM", "/usr/bin/chromium")
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


# ----------------------------------------------------------------------------- fast: pages and files


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    srv = start_server(tmp_path_factory.mktemp("dashboard"), "sqlite-local")
    yield srv
    srv.stop()


def test_pages_and_static_files_are_served(api_server: ApiServer) -> None:
    from api.dashboard.routes import HERE, PAGES

    c = api_server.client()
    r = c.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    assert c.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    pages = [*PAGES, "/ui/jobs/job_0123456789abcdef0123456789abcdef"]
    scripts = set()
    for path in pages:
        r = c.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        html = r.text
        assert '<html lang="en">' in html and 'role="alert"' in html and "<h1" in html
        # every control has a label: an id'd control is named by <label for>, the others sit inside a <label>
        for control in re.findall(r"<(?:input|select)\b[^>]*>", html):
            cid = re.search(r'\bid="([^"]+)"', control)
            assert (cid and f'for="{cid.group(1)}"' in html) or ('type="checkbox"' in control), (path, control)
        scripts |= set(re.findall(r'src="(/ui/static/[^"]+)"', html))
    assert "/ui/static/js/job.js" in scripts and any("plotly.min.js" in s for s in scripts)
    assert c.get("/ui/jobs", follow_redirects=False).headers["location"] == "/ui/"

    # every file of the static directory, with a type a browser accepts for it (ES modules need a JS type)
    want = {".js": "javascript", ".css": "text/css"}
    files = [p for p in (HERE / "static").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= set(want)
    for p in files:
        r = c.get(f"/ui/static/{p.relative_to(HERE / 'static').as_posix()}")
        assert r.status_code == 200 and want[p.suffix] in r.headers["content-type"], p
        assert r.headers["cache-control"] == "no-cache"
    js_imports = {m for p in files if p.suffix == ".js" for m in re.findall(r'from "\./([\w.]+)"', p.read_text())}
    assert js_imports and all((HERE / "static" / "js" / m).is_file() for m in js_imports)

    plotly = c.get(next(s for s in scripts if "plotly.min.js" in s))
    assert plotly.status_code == 200 and "javascript" in plotly.headers["content-type"]
    assert len(plotly.content) > 1_000_000 and b"plotly" in plotly.content[:2000].lower()
    assert c.get("/ui/static/nope.js").status_code == 404
    assert c.get("/ui/static/%2e%2e/routes.py").status_code == 404  # no way out of the static directory


def test_model_detail_counts_parameters(api_server: ApiServer) -> None:
    tenant = api_server.new_tenant()
    mid = api_server.ready_model(tenant)
    detail = api_server.client(tenant.token).get(f"/v1/models/{mid}").json()
    # tiny_model_files: a 64×64 float32 weight and a 64-element bias
    assert detail["parameter_count"] == 64 * 64 + 64
    no_weights = api_server.client(tenant.token).post("/v1/models", json={"name": "empty"}).json()["id"]
    assert api_server.client(tenant.token).get(f"/v1/models/{no_weights}").json()["parameter_count"] is None
    assert set(tiny_model_files()) >= {"model.safetensors"}


# ----------------------------------------------------------------------------- browser: the whole flow

JOB_TIMEOUT = 600
# Chromium reports every non-2xx fetch as a console error; the API's refusals that the tests provoke (bad key,
# unknown Hub model, refused job values) are expected, anything else (a missing static file, say) is not.
EXPECTED_CONSOLE = re.compile(r"Failed to load resource: the server responded with a status of (401|404|422)")


def _unexpected_console(m: Any) -> bool:
    api_refusal = EXPECTED_CONSOLE.search(m.text) and "/v1/" in (m.location or {}).get("url", "")
    return m.type == "error" and not api_refusal


@dataclass
class Served:
    base: str
    key: str
    data_dir: Path
    log: Path
    proc: subprocess.Popen

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.key}"}, timeout=60)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # serve stops its worker's process group itself
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def _nwc(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`python -m codec.cli ARGS` as its own process group, output to `log`, stopped on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "codec.cli", *args], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def hub(minilm_dir: Path) -> Iterator[FakeHub]:
    fake = FakeHub({HUB_ID: repo_of_dir(minilm_dir)})
    yield fake
    fake.close()


@pytest.fixture
def served(tmp_path: Path, hub: FakeHub) -> Iterator[Served]:
    """`nwc serve` as a user starts it (API + local worker, SQLite, local store, filesystem broker), on a free port
    and with no NWC_PUBLIC_URL: serve derives it from --port, so presigned URLs reach this process. Model IDs are
    imported from a local server that speaks the Hub's file API."""
    from services import free_ports

    port = free_ports(1)[0]
    data = tmp_path / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NWC_DATA_DIR": str(data), "NWC_WORKER_DEVICE": "cpu",
           "NWC_HF_ENDPOINT": hub.url}
    env.pop("NWC_PUBLIC_URL", None)
    # set in this process by codec.assets / codec.evaluate (huggingface_hub reads either); imports go to the local
    # Hub server
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(var, None)
    log = tmp_path / "serve.log"
    with _nwc(["serve", "--port", str(port)], env, log) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, log.read_text)
        key = (data / "local-api-key").read_text().strip()  # written by serve's first start, before it listens
        yield Served(base, key, data, log, proc)


@pytest.fixture
def served_production(tmp_path: Path, postgres_server: PostgresServer, redis_url: str,  # noqa: F811
                      s3_config: S3Config) -> Iterator[Served]:  # noqa: F811
    """Production layout: PostgreSQL, Redis and SeaweedFS (S3), `nwc serve --no-worker`, one `nwc worker`, a key from
    `nwc admin create-key`. The browser uploads to and downloads from the S3 server itself (presigned URLs, another
    origin than the dashboard's: SeaweedFS answers CORS for any origin by default, DEPLOY.md says what S3 needs)."""
    import redis
    from services import free_ports

    port = free_ports(1)[0]
    broker = redis_url.rsplit("/", 1)[0] + "/6"
    redis.Redis.from_url(broker).flushdb()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NWC_WORKER_DEVICE": "cpu", "NWC_BROKER_URL": broker,
           "NWC_DATABASE_URL": postgres_server.new_database("dashboard"), "NWC_DATA_DIR": str(tmp_path / "data"),
           "NWC_PUBLIC_URL": f"http://127.0.0.1:{port}",
           **{f"NWC_{k.upper()}": v for k, v in s3_config.settings().items()}}
    log = tmp_path / "api.log"
    with _nwc(["serve", "--no-worker", "--port", str(port)], env, log) as api:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api, log.read_text)  # serve has migrated the database
        key = subprocess.run([sys.executable, "-m", "codec.cli", "admin", "create-key", "--tenant", "ui",
                              "--create-tenant"], env=env, cwd=ROOT, capture_output=True, text=True, check=True
                             ).stdout.strip()
        with _nwc(["worker", "--concurrency", "1"], env, tmp_path / "worker.log"):
            yield Served(base, key, tmp_path / "data", log, api)


@pytest.fixture
def small_llama(smollm2_dir: Path, tmp_path: Path) -> Path:
    from real_models import cut_smollm2

    return cut_smollm2(smollm2_dir, tmp_path / "SmolLM2-3blocks", 3)


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _value(page, selector: str) -> float:
    return float(page.eval_on_selector(selector, "e => e.value"))


@contextlib.contextmanager
def _chromium_page(problems: list[str]) -> Iterator[Any]:
    """A 1280×800 page in real headless Debian Chromium; console errors (but the expected API refusals) and page
    errors are appended to `problems`."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (it apt-installs Debian's chromium)", pytrace=False)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        ctx = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        page.on("console", lambda m: _unexpected_console(m) and problems.append(f"console: {m.text} {m.location}"))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        try:
            yield page
        finally:
            browser.close()


def _sign_in(page: Any, served: Served, then: str = "/ui/") -> None:
    """Sign in on the sign-in page; it goes on to `then` (the page that sent it there)."""
    page.get_by_label("API key", exact=True).fill(served.key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{served.base}{then}")


def _upload(page: Any, files: list[Path], name: str, selected: int | None = None) -> None:
    """On the models page: pick `files` (`selected` files are then listed), name the model, upload, wait until it is
    ready."""
    from playwright.sync_api import expect

    page.get_by_label("Choose files", exact=True).set_input_files([str(f) for f in files])
    page.get_by_label("Model name", exact=True).fill(name)
    expect(page.locator("#selected-summary")).to_contain_text(f"{selected or len(files)} files selected")
    page.get_by_role("button", name="Upload", exact=True).click()
    page.wait_for_function("() => document.getElementById('upload-progress').value === 100", timeout=120_000)
    expect(page.locator("#notices")).to_contain_text("is uploaded and ready", timeout=60_000)
    expect(page.locator("#models-body tr", has_text=name)).to_contain_text("Ready")
    assert page.locator("#upload-percent").inner_text() == "100 %"


def _download_matches(page: Any, api: httpx.Client, job_id: str, name: str) -> str:
    """Click the artifact's download link; the file's sha256 and size are the API's. Returns the URL it came from."""
    art = next(a for a in api.get(f"/v1/jobs/{job_id}/artifacts").json() if a["name"] == name)
    with page.expect_download() as dl:
        page.get_by_role("link", name=f"Download {name}").click()
    download = dl.value
    assert download.suggested_filename == name.replace("/", "_")  # the store's Content-Disposition; "/" → "_"
    with open(download.path(), "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == art["sha256"]
    assert Path(download.path()).stat().st_size == art["size"]
    return download.url


@pytest.mark.slow
def test_dashboard_in_chromium(served: Served, small_llama: Path) -> None:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    problems: list[str] = []
    with _chromium_page(problems) as page:
        from playwright.sync_api import expect

        # --- sign in: a page needs a key first; a bad key is refused in plain words
        page.goto(f"{served.base}/")
        page.wait_for_url(re.compile(r"/ui/signin\?next="))
        page.get_by_label("API key", exact=True).fill("nwc_notakey_0000")
        page.get_by_role("button", name="Sign in").click()
        alert = page.locator("#alerts .alert.error")
        expect(alert).to_contain_text("Could not sign in: The API key was not accepted")
        _shot(page, "signin")
        _sign_in(page, served)
        expect(page.locator("#jobs-empty")).to_be_visible()

        # --- models: drag and drop adds to the selection; the file picker adds the model; upload to 100 %
        page.locator("nav").get_by_role("link", name="Models", exact=True).click()
        page.wait_for_url("**/ui/models")
        page.evaluate("""() => {
            const dt = new DataTransfer();
            dt.items.add(new File(["# SmolLM2, first 3 blocks\\n"], "README.md", {type: "text/markdown"}));
            dt.items.add(new File(["x"], "pytorch_model.bin"));
            document.getElementById("dropzone").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
        }""")
        expect(page.locator("#selected-files")).to_contain_text("README.md")
        expect(page.locator("#selected-files")).to_contain_text("pickle checkpoint: refused")
        files = sorted(f for f in small_llama.iterdir() if f.is_file())
        t = time.monotonic()
        _upload(page, files, "SmolLM2 (3 blocks)", selected=len(files) + 1)
        timings["upload"] = time.monotonic() - t
        row = page.locator("#models-body tr", has_text="SmolLM2 (3 blocks)")
        _shot(page, "models")
        with served.api() as api:
            (model,) = [m for m in api.get("/v1/models").json()["items"] if m["name"] == "SmolLM2 (3 blocks)"]
            detail = api.get(f"/v1/models/{model['id']}").json()
        sent = {f["path"]: f["size"] for f in detail["files"]}
        assert sent == {**{f.name: f.stat().st_size for f in files}, "README.md": 26}
        from safetensors import safe_open

        with safe_open(str(small_llama / "model.safetensors"), "pt") as st:
            n_params = sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        assert detail["parameter_count"] == n_params
        # the weights went up in parts through presigned part URLs (bigger than one 64 MiB part)
        assert (small_llama / "model.safetensors").stat().st_size > 64 << 20
        assert '"route": "/v1/models/{model_id}/uploads/{upload_id}/complete"' in served.log.read_text()

        # --- new job: an API refusal in plain words, the predicted size, then an NWC job at 4 bits
        row.get_by_role("link", name="New job").click()
        page.wait_for_url("**/ui/jobs/new?model_id=*")
        expect(page.locator("#predicted-size")).to_contain_text(f"{n_params:,} parameters")
        page.get_by_label("Target bits per weight", exact=True).fill("9")
        page.get_by_role("button", name="Start job").click()
        expect(alert).to_contain_text("Could not start the job: Some values were not accepted: target_bits for nwc "
                                      "must be in 1..8, got 9.")
        page.get_by_label("Target bits per weight", exact=True).fill("4")
        expect(page.locator("#predicted-size")).to_contain_text(f"{4 * n_params / 8 / 1e6:.1f} MB")
        page.get_by_label("Method", exact=True).select_option("nwc")
        page.get_by_label("Calibration", exact=True).select_option("none")
        page.get_by_label("Decoded dense model", exact=True).uncheck()
        page.locator("#advanced summary").click()
        page.get_by_label("Evaluation tokens (held-out text)", exact=True).fill("64")
        _shot(page, "new-job")
        page.get_by_role("button", name="Start job").click()
        page.wait_for_url(re.compile(r"/ui/jobs/job_[0-9a-f]+$"))
        job_id = page.url.rsplit("/", 1)[1]

        # --- jobs list: the job's progress advances while it runs
        page.locator("nav").get_by_role("link", name="Jobs", exact=True).click()
        page.wait_for_url(f"{served.base}/ui/")
        bar = f'tr[data-job-id="{job_id}"] progress'
        t = time.monotonic()
        seen: list[float] = []
        shot_taken = phone_checked = False
        deadline = time.monotonic() + JOB_TIMEOUT
        while True:
            state = page.get_attribute(f'tr[data-job-id="{job_id}"]', "data-state")
            seen.append(_value(page, bar))
            if state == "running" and 0 < seen[-1] < 1 and not shot_taken:
                _shot(page, "jobs")
                shot_taken = True
            if state == "running" and shot_taken and not phone_checked:
                # phone width: the list becomes cards, and nothing needs horizontal scrolling
                page.set_viewport_size({"width": 390, "height": 844})
                page.wait_for_timeout(300)
                assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
                _shot(page, "jobs-phone")
                page.set_viewport_size({"width": 1280, "height": 800})
                phone_checked = True
            if state in ("succeeded", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, served.log.read_text()[-5000:]
            page.wait_for_timeout(500)
        timings["job"] = time.monotonic() - t
        assert state == "succeeded", served.log.read_text()[-5000:]
        increases = sum(b > a for a, b in zip(seen, seen[1:], strict=False))
        assert seen[-1] == 1 and increases >= 2, seen  # it moved while we watched, more than once
        assert phone_checked, seen

        # --- keyboard only: the skip link comes first, then Tab reaches the job's link (rows are updated in
        # place by the polling, so focus stays put) and Enter opens it
        page.reload()
        page.wait_for_selector(f'tr[data-job-id="{job_id}"]')
        page.keyboard.press("Tab")
        assert page.evaluate("() => document.activeElement.className") == "skip-link"
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate("() => document.activeElement.getAttribute('href')") == f"/ui/jobs/{job_id}":
                break
        else:
            pytest.fail("the job's link is not reachable with Tab")
        page.keyboard.press("Enter")

        # --- the finished job: stages, evaluation, plots with data, per-layer table
        page.wait_for_url(f"**/ui/jobs/{job_id}")
        expect(page.locator("#stage-timeline li")).to_have_count(5)
        expect(page.locator("#eval-summary")).to_contain_text("Perplexity")
        for plot in ("plot-ppl", "plot-bits"):
            expect(page.locator(f"#{plot} .main-svg").first).to_be_visible()
        plot_counts = """() => [document.getElementById('plot-ppl').data.length,
            document.getElementById('plot-bits').data.filter(t => t.type === 'bar')
                .reduce((s, t) => s + t.y.length, 0)]"""
        n_traces, n_bars = page.evaluate(plot_counts)
        assert n_traces == 3 and n_bars >= 3 * 7  # this job, the original's point and line; 7 matrices per block
        assert page.locator("#layers-body tr").count() > n_bars  # coded tensors and the ones stored as is

        # --- a baseline for the plot, from the page's link: the form comes filled in (method, bits, calibration,
        # the same evaluation tokens); it runs, and the plot then shows it
        compare = page.locator("#plot-ppl-compare")
        expect(compare).to_contain_text("RTN at 4 bits")
        expect(compare).to_contain_text("GPTQ at 4 bits")
        compare.get_by_role("link", name="RTN at 4 bits").click()
        page.wait_for_url("**/ui/jobs/new?*method=rtn*")
        expect(page.get_by_label("Method", exact=True)).to_have_value("rtn")  # once the page has loaded the models
        expect(page.get_by_label("Target bits per weight", exact=True)).to_have_value("4")
        expect(page.get_by_label("Calibration", exact=True)).to_have_value("wiki")
        page.locator("#advanced summary").click()
        expect(page.get_by_label("Evaluation tokens (held-out text)", exact=True)).to_have_value("64")
        page.get_by_label("Calibration sequences", exact=True).fill("4")
        page.get_by_label("Tokens per calibration sequence", exact=True).fill("64")
        page.get_by_label("Decoded dense model", exact=True).uncheck()
        page.get_by_role("button", name="Start job").click()
        page.wait_for_url(re.compile(r"/ui/jobs/job_[0-9a-f]+$"))
        expect(page.get_by_role("link", name="Download bundle/model.nwc")).to_be_visible(timeout=JOB_TIMEOUT * 1000)
        page.goto(f"{served.base}/ui/jobs/{job_id}")
        expect(page.locator("#plot-ppl-caption")).to_contain_text("1 other finished job of this model")
        assert page.evaluate(plot_counts)[0] == 4  # the RTN job joined the plot
        expect(compare).not_to_contain_text("RTN")
        expect(compare).to_contain_text("GPTQ at 4 bits")
        _shot(page, "job")
        page.set_viewport_size({"width": 390, "height": 844})  # the longest page fits a phone's width too
        page.wait_for_timeout(500)
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        page.set_viewport_size({"width": 1280, "height": 800})

        # --- download the bundle through its presigned URL; the bytes match the sha256 the API recorded
        with served.api() as api:
            arts = {a["name"] for a in api.get(f"/v1/jobs/{job_id}/artifacts").json()}
            assert {"bundle/model.nwc", "report.json"} <= arts and not any(n.startswith("dense/") for n in arts)
            _download_matches(page, api, job_id, "bundle/model.nwc")

        # --- NoWag-P from the form: a pattern instead of bits, data-free; its page names the pattern and offers
        # the Wanda baseline at the same pattern
        page.goto(f"{served.base}/ui/jobs/new?model_id={model['id']}")
        expect(page.get_by_label("Model", exact=True)).to_have_value(model["id"])  # the models have loaded
        page.get_by_label("Method", exact=True).select_option("nowag-p")
        expect(page.get_by_label("Target bits per weight", exact=True)).to_be_hidden()
        page.get_by_label("Pruning: sparsity (such as 0.5) or N:M pattern (such as 2:4)", exact=True).fill("2:4")
        page.get_by_label("Calibration", exact=True).select_option("none")
        page.get_by_label("Decoded dense model", exact=True).uncheck()
        page.locator("#advanced summary").click()
        page.get_by_label("Evaluation tokens (held-out text)", exact=True).fill("64")
        page.get_by_role("button", name="Start job").click()
        page.wait_for_url(re.compile(r"/ui/jobs/job_[0-9a-f]+$"))
        expect(page.get_by_role("link", name="Download bundle/model.nwc")).to_be_visible(timeout=JOB_TIMEOUT * 1000)
        expect(page.locator("#job-title")).to_contain_text("NOWAG-P 2:4 sparse")
        expect(page.locator("#plot-ppl-compare")).to_contain_text("WANDA 2:4 sparse")
        _shot(page, "job-nowag-p")

        # --- import by model ID: an unknown one is refused in plain words, MiniLM comes in from the (local) Hub
        page.locator("nav").get_by_role("link", name="Models", exact=True).click()
        page.wait_for_url("**/ui/models")
        page.get_by_label("Model ID", exact=True).fill("acme/nope")
        page.get_by_role("button", name="Import", exact=True).click()
        expect(alert).to_contain_text("Could not import acme/nope")
        page.get_by_label("Model ID", exact=True).fill(HUB_ID)
        page.get_by_role("button", name="Import", exact=True).click()
        expect(page.locator("#notices")).to_contain_text(f"Importing {HUB_ID}")
        hub_row = page.locator("#models-body tr", has_text=f"Hub {HUB_ID}")
        expect(hub_row).to_contain_text("Ready", timeout=120_000)
        _shot(page, "models-import")

        # --- a job that fails: GPTQ needs a causal LM, MiniLM is an encoder (the worker fails it at plan)
        hub_row.get_by_role("link", name="New job").click()
        page.wait_for_url("**/ui/jobs/new?model_id=*")
        expect(page.locator("#predicted-size")).to_contain_text("parameters")
        page.get_by_label("Method", exact=True).select_option("gptq")
        assert page.get_by_label("Calibration", exact=True).input_value() == "wiki"  # model-free is nwc only
        page.get_by_role("button", name="Start job").click()
        page.wait_for_url(re.compile(r"/ui/jobs/job_[0-9a-f]+$"))
        failure = page.locator("#job-error")
        expect(failure).to_contain_text("This job failed. Reason: calibrated compression needs a causal language "
                                        "model", timeout=JOB_TIMEOUT * 1000)
        expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
        _shot(page, "job-failed")
        failed_job = page.url.rsplit("/", 1)[1]
        with served.api() as api:
            first_end = api.get(f"/v1/jobs/{failed_job}").json()["finished_at"]
            page.get_by_role("button", name="Retry job").click()  # a lasting cause: it runs and fails again
            expect(page.locator("#notices")).to_contain_text("The job is queued again.")
            deadline = time.monotonic() + JOB_TIMEOUT
            while (j := api.get(f"/v1/jobs/{failed_job}").json())["finished_at"] in (None, first_end):
                assert time.monotonic() < deadline, j
                time.sleep(0.5)
        assert j["state"] == "failed", j
        expect(failure).to_contain_text("needs a causal language model")
        expect(page.get_by_role("button", name="Retry job")).to_be_visible()

        # --- signing out forgets the key in this tab
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url("**/ui/signin?reason=signed-out")
        assert page.evaluate("() => sessionStorage.length") == 0
        page.goto(f"{served.base}/ui/models")
        page.wait_for_url(re.compile(r"/ui/signin\?next="))
    assert not problems, problems
    print(f"dashboard in chromium: {time.monotonic() - t0:.0f} s "
          + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))



@pytest.mark.slow
def test_dashboard_in_production_mode(served_production: Served, small_llama: Path, s3_config: S3Config) -> None:  # noqa: F811
    """The dashboard against the production layout: the browser sends the weights to S3 in parts through presigned
    part URLs, an RTN job started from the form is cancelled and retried from its page, and the bundle comes from S3
    through its presigned URL with the sha256 the API recorded."""
    served = served_production
    problems: list[str] = []
    with _chromium_page(problems) as page:
        from playwright.sync_api import expect

        page.goto(f"{served.base}/ui/models")
        page.wait_for_url(re.compile(r"/ui/signin\?next="))
        _sign_in(page, served, then="/ui/models")
        files = sorted(f for f in small_llama.iterdir() if f.is_file())
        with page.expect_request(lambda r: r.method == "PUT" and r.url.startswith(s3_config.endpoint_url)) as put:
            _upload(page, files, "SmolLM2 (3 blocks)")
        assert "partNumber=" in put.value.url  # a multipart part, straight to the store

        page.locator("#models-body tr", has_text="SmolLM2 (3 blocks)").get_by_role("link", name="New job").click()
        page.wait_for_url("**/ui/jobs/new?model_id=*")
        page.get_by_label("Method", exact=True).select_option("rtn")
        page.get_by_label("Target bits per weight", exact=True).fill("4")
        page.get_by_label("Calibration", exact=True).select_option("wiki")
        page.get_by_label("Decoded dense model", exact=True).uncheck()
        page.locator("#advanced summary").click()
        page.get_by_label("Calibration sequences", exact=True).fill("4")
        page.get_by_label("Tokens per calibration sequence", exact=True).fill("64")
        page.get_by_label("Evaluation tokens (held-out text)", exact=True).fill("64")
        page.get_by_role("button", name="Start job").click()
        page.wait_for_url(re.compile(r"/ui/jobs/job_[0-9a-f]+$"))
        job_id = page.url.rsplit("/", 1)[1]

        # cancel while it waits or runs, then retry: it runs to the end
        page.get_by_role("button", name="Cancel job").click()
        expect(page.locator("#job-error")).to_contain_text("This job was cancelled.", timeout=JOB_TIMEOUT * 1000)
        page.get_by_role("button", name="Retry job").click()
        expect(page.locator("#notices")).to_contain_text("The job is queued again.")
        link = page.get_by_role("link", name="Download bundle/model.nwc")
        expect(link).to_be_visible(timeout=JOB_TIMEOUT * 1000)
        expect(page.locator("#job-error")).to_be_hidden()
        with served.api() as api:
            job = api.get(f"/v1/jobs/{job_id}").json()
            assert job["state"] == "succeeded" and job["attempts"] == 1, job
            url = _download_matches(page, api, job_id, "bundle/model.nwc")
        assert url.startswith(s3_config.endpoint_url), url  # presigned, served by the store, not the API
    assert not problems, problems
