"""`resdsn report`: QA overlays (colours, slice, orientation), the HTML page's contents, and the
page rendered in headless Chromium with all its images (Playwright, the system's Chromium)."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from metrics_output import OUT_OF_MEMORY, SHAPE, Spec, build_output, prediction, write_run
from scipy import ndimage

from resdsn_ray import config, pictures, query, report
from resdsn_ray.cli import main
from resdsn_ray.synthetic import make_case
from resdsn_ray.volumes import read_volume

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_output(tmp_path_factory.mktemp("report") / "out")


@pytest.fixture(scope="module")
def page_file(output: Path) -> Path:
    return Path(report.build_report(str(output)))


class Page(HTMLParser):
    """What a test needs of a page: tables (rows of cell texts), images, links, figure captions."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.captions: list[str] = []
        self._cell: list[str] | None = None
        self._caption: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attr["src"] or "")
        elif tag == "a":
            self.links.append(attr["href"] or "")
        elif tag == "figcaption":
            self._caption = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "figcaption" and self._caption is not None:
            self.captions.append("".join(self._caption).strip())
            self._caption = None

    def handle_data(self, data: str) -> None:
        for sink in (self._cell, self._caption):
            if sink is not None:
                sink.append(data)


def colour_shares(picture: np.ndarray) -> dict[str, float]:
    """Shares of the picture's pixels that are red, green and yellow (over grey CT, alpha 0.5)."""
    r, g, b = (picture[..., c].astype(float) for c in range(3))
    yellow = (r - b > 0.25) & (g - b > 0.25)
    return {"red": np.mean((r - g > 0.25) & ~yellow), "green": np.mean((g - r > 0.25) & ~yellow), "yellow": np.mean(yellow)}


def test_overlay_colours_slice_and_orientation() -> None:
    image, label, affine = make_case(7, SHAPE, orientation="RAS")
    mask = prediction(label, (2, 1, 1))  # grown: more green than red, so swapped colours show
    picture, k = pictures.overlay(image, label, mask, affine)
    assert k == np.bincount(np.nonzero(label)[2], minlength=SHAPE[2]).argmax()
    truth, pred = label[:, :, k] > 0, mask[:, :, k] > 0
    expected = {"red": np.mean(truth & ~pred), "green": np.mean(pred & ~truth), "yellow": np.mean(truth & pred)}
    assert all(v > 0 for v in expected.values())
    assert colour_shares(picture) == pytest.approx(expected, abs=1e-12)
    # RAS voxels: i runs to the patient's right, j anterior. Screen: right on the left, anterior up.
    rows, cols = picture.shape[0] // SHAPE[1], picture.shape[1] // SHAPE[0]
    assert picture.shape[:2] == (SHAPE[1] * rows, SHAPE[0] * cols) and min(picture.shape[:2]) >= pictures.MIN_SIDE_PX
    low, high = pictures.WINDOW_HU
    grey = np.clip((image[:, :, k] - low) / (high - low), 0, 1)[::-1, ::-1].T
    plain = ~(truth | pred)[::-1, ::-1].T
    shown = picture[::rows, ::cols]
    assert np.allclose(shown[..., 0][plain], grey[plain]) and np.allclose(shown[..., 2], shown[..., 2].clip(0, 1))


@pytest.mark.parametrize("orientation", ["LPS", "LAS", "RPI"])
def test_overlay_is_the_same_picture_in_any_orientation(orientation: str) -> None:
    """The same patient stored with flipped axes draws the same picture (masks made in world space)."""
    drawn = []
    for code in ("RAS", orientation):
        image, label, affine = make_case(11, SHAPE, orientation=code)
        mask = ndimage.binary_dilation(label).astype(np.uint8)  # symmetric, so the same in any axis order
        drawn.append(pictures.overlay(image, label, mask, affine)[0])
    assert np.array_equal(*drawn)


def test_report_page_contents(output: Path, page_file: Path) -> None:
    assert page_file == output / "report" / "index.html"
    text = page_file.read_text()
    page = Page(text)
    frame = pd.concat([pd.read_parquet(f) for f in sorted(output.glob("metrics/run_id=*/*.parquet"))])
    latest = frame[frame.status != "skipped"].sort_values("finished_at").groupby(["case_id", "mode"]).tail(1)
    c2f = latest[(latest["mode"] == "c2f") & latest.dsc.notna()].sort_values("dsc")

    # summary tables: the exact lines of query.summary
    for by in query.SUMMARY_BY:
        headers, lines = query.summary(str(output), by=by).table()
        assert [headers, *lines] in page.tables
    # overlays of the worst, median and best C2F cases, with their DSC
    picks = {"worst": c2f.iloc[0], "median": c2f.iloc[(len(c2f) - 1) // 2], "best": c2f.iloc[-1]}
    for role, row in picks.items():
        caption = next(c for c in page.captions if c.startswith(f"{role}: "))
        assert caption.startswith(f"{role}: {row.case_id}, DSC {row.dsc:.4f}, slice k = ")
        name = f"overlay-{role}-c2f-{row.case_id}.png"
        assert name in page.images and name in page.links
        drawn = matplotlib.image.imread(page_file.parent / name)[..., :3]
        label, mask = read_volume(row.label_uri).array, read_volume(row.mask_uri).array
        k = int(caption.rsplit("= ", 1)[1])
        truth, pred = label[:, :, k] > 0, mask[:, :, k] > 0
        assert colour_shares(drawn) == pytest.approx(
            {"red": np.mean(truth & ~pred), "green": np.mean(pred & ~truth), "yellow": np.mean(truth & pred)}, abs=1e-12)
    assert {"dsc-by-mode.png", "dsc-by-fold.png"} <= set(page.images)
    # the per-case table: every current case, by DSC ascending, overlays linked
    cases = next(t for t in page.tables if t[0][:2] == ["case_id", "mode"] and "dsc" in t[0])
    assert len(cases) - 1 == len(latest)
    dscs = [float(r[4]) for r in cases[1:] if r[4] != "-"]
    assert dscs == sorted(dscs) and len(dscs) == latest.dsc.notna().sum()
    # throughput per node over every attempt that did work; time per stage and the slowest cases over the latest rows
    worked = frame[frame.status != "skipped"]
    nodes = next(t for t in page.tables if t[0][0] == "node")
    assert {r[0]: (int(r[1]), int(r[2])) for r in nodes[1:]} == {
        node: (len(group), int((group.status == "error").sum())) for node, group in worked.groupby("node")}
    stages = next(t for t in page.tables if t[0][0] == "stage")
    assert [r[:2] for r in stages[1:]] == [["read", str(latest.t_read_s.notna().sum())], ["total", str(latest.t_total_s.notna().sum())]]
    slow = next(t for t in page.tables if t[0][:4] == ["case_id", "mode", "status", "t_wall_s"])
    expected = latest[latest.t_total_s.notna()].sort_values("t_total_s", ascending=False, kind="stable").head(report.SLOWEST)
    assert [float(r[4]) for r in slow[1:]] == pytest.approx(list(expected.t_total_s))
    assert "throughput.png" in page.images
    # errors with their reasons, escaped; provenance in <details>, escaped
    errors = next(t for t in page.tables if t[0] == ["case_id", "mode", "run_id", "reason"])
    assert sorted(r[3] for r in errors[1:]) == sorted(latest[latest.status == "error"].error)
    assert OUT_OF_MEMORY not in text and "CUDA out of memory &lt;fine stage&gt; &amp; &#x27;more&#x27;" in text
    assert "gzip" not in text  # case 5's error is history: it recovered in run B
    assert "<script" not in text and "&lt;/pre&gt;&lt;script&gt;" in text
    assert text.count("<details>") == len(set(frame.run_id)) + 2  # run records (or their absence), cv.json, splits.json
    # a cross-validation's folds with each model's fitness (a collapsed training is unfit), escaped
    folds = next(t for t in page.tables if t[0] == ["fold", "state", "coarse model", "fine model"])
    assert folds[1:] == [["0", "done", "fit", "fit"],
                         ["1", "failed: model bundle marked unfit", "UNFIT: validation DSC 0.0 <b>", "not trained"]]
    assert "UNFIT: validation DSC 0.0 &lt;b&gt;" in text


def test_report_without_labels_or_with_only_errors(tmp_path: Path) -> None:
    unlabelled = tmp_path / "unlabelled"
    write_run(unlabelled, "r1", "c2f", [Spec(1, labelled=False), Spec(2, labelled=False)], day=0)
    text = Path(report.build_report(str(unlabelled))).read_text()
    assert "no overlays" in text and "no case has a DSC" in text
    # the predictions alone: the largest and the smallest (no volumes in these rows: by case id), and the throughput
    page = Page(text)
    assert page.images == ["overlay-largest-c2f-case_0001.png", "overlay-smallest-c2f-case_0002.png", "throughput.png"]
    assert [c.split(",")[0] for c in page.captions[:2]] == ["largest: case_0001 (ResDSN C2F)", "smallest: case_0002 (ResDSN C2F)"]
    drawn = matplotlib.image.imread(unlabelled / "report" / page.images[0])[..., :3]
    shares = colour_shares(drawn)
    assert shares["green"] > 0 and shares["red"] == shares["yellow"] == 0  # prediction only

    failed = tmp_path / "failed"
    write_run(failed, "r1", "coarse", [Spec(1, status=config.STATUS_ERROR, error="bad <dicom>")], day=0)
    html_file = tmp_path / "elsewhere" / "failed.html"
    assert main(["report", str(failed), "--html", str(html_file)]) == 0
    page = Page(html_file.read_text())
    errors = next(t for t in page.tables if t[0] == ["case_id", "mode", "run_id", "reason"])
    assert errors[1] == ["case_0001", "coarse", "r1", "bad <dicom>"]  # escaped: parsed back as text, not a tag


def test_report_of_selected_runs_and_bad_input(output: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    html_file = tmp_path / "cv7" / "index.html"
    assert main(["report", str(output), "--run", "cv7", "--html", str(html_file)]) == 0
    assert capsys.readouterr().out == f"wrote {html_file}\n"
    page = Page(html_file.read_text())
    cases = next(t for t in page.tables if t[0][:2] == ["case_id", "mode"] and "dsc" in t[0])
    assert {r[8] for r in cases[1:]} == {"cv7-fold0-c2f", "cv7-fold0-coarse", "cv7-fold1-c2f", "cv7-fold1-coarse"}
    assert all((html_file.parent / image).is_file() for image in page.images)
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no metrics rows" in capsys.readouterr().err


@pytest.mark.s3
def test_report_of_an_s3_output(output: Path, s3_bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(output / "metrics") + "/", f"{s3_bucket}/out/metrics/", recursive=True)
    uri = report.build_report(f"{s3_bucket}/out")
    assert uri == f"{s3_bucket}/out/report/index.html"
    page = Page(fs.cat_file(uri).decode())
    assert len(page.images) == 7  # two plots, four overlays, the throughput (images and labels stay local)
    assert all(fs.exists(f"{s3_bucket}/out/report/{unquote(image)}") for image in page.images)


# ---------------------------------------------------------------------------------------------
# In a browser


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (CI installs Debian's `chromium` package in .ci/run)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the project's test extra")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def serve() -> Iterator[object]:
    """Serve a folder on 127.0.0.1 for the test's duration; yields a function folder -> base URL."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 -- the base class's name
        pass


def render_in_chromium(browser, base: str, page_name: str) -> dict:
    """Load a report page; its console errors, page errors, requests elsewhere, images and links."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
    outside: list[str] = []

    def only_local(route) -> None:
        if route.request.url.startswith(base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    response = page.goto(base + page_name, wait_until="load")
    assert response is not None and response.ok
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])")
    links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    statuses = {link: page.request.get(link).status for link in set(links)}
    page.close()
    return {"problems": problems, "outside": outside, "images": images, "links": links, "statuses": statuses}


@pytest.mark.parametrize("kind", ["full", "errors only"])
def test_report_renders_in_chromium(browser, serve, output: Path, page_file: Path, tmp_path: Path, kind: str) -> None:
    if kind == "full":
        # two DSC plots, three QA overlays, one unlabelled prediction, the throughput; links: plots' captions,
        # the overlays' images and the case table's overlay links
        folder, expected_images, expected_png_links = page_file.parent, 7, 10
    else:
        failed = tmp_path / "failed"
        write_run(failed, "r1", "c2f", [Spec(1, status=config.STATUS_ERROR, error="<img src=x onerror=alert(1)>")], day=0)
        folder, expected_images, expected_png_links = Path(report.build_report(str(failed))).parent, 1, 0  # the throughput
    seen = render_in_chromium(browser, serve(folder), "index.html")
    assert seen["problems"] == [] and seen["outside"] == []
    assert len(seen["images"]) == expected_images
    assert all(complete and width > 0 for _, complete, width in seen["images"]), seen["images"]
    assert all(status == 200 for status in seen["statuses"].values()), seen["statuses"]
    assert len([link for link in seen["links"] if urlparse(link).path.endswith(".png")]) == expected_png_links
