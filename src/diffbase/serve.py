"""`diffbase serve`: a Gradio app over the methods' inference API (the same load/run the CLI calls).

Tabs: try-on (VTON / CatVTON, DreamFit try-on), DreamFit garment and pose generation, DreamO
customization, Kontext edit and Fill inpainting, upscaling (every method package's ui.py), then Train
(experiment configs run as `diffbase train` jobs, one at a time, with live plots, stop and resume), the
training monitor (any run folder) and the session's gallery (each result with its settings, to run again).
Models are local folders; the defaults are the shipped toy zoo and examples, so every tab runs on its first
click on any machine.

Safety: it binds to 127.0.0.1 unless told otherwise, and binding beyond this machine needs --auth /
--auth-file; --models-root keeps every path field under one folder; uploads are limited in bytes (the server
refuses larger ones) and in pixels (checked from the header before decoding, so a decompression bomb never
decodes); upload names are never used as paths (only the server's own temporary copies are read), and a
session's uploads are removed when its page closes; one queue with a single worker, and a lock around the
models, so two requests never run a model at once; bad input shows as one line in its own tab and the
server keeps serving.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from diffbase.errors import UserError
from diffbase.interface.web import (  # noqa: F401  (the app's pieces, as tests and users import them from here)
    EXAMPLES,
    FLAGS,
    LOOPBACK,
    ZOO,
    App,
    Defaults,
    Limits,
    Models,
    Request,
    checked_image,
    checked_mask,
    checked_size,
    guarded,
    relabel,
    user_message,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "experiments"  # a clone's experiment configs
MONITOR = "a `diffbase train` output folder"
DATA = "training data folder (data.train_path)"


def smoothed(points: list[tuple[float, float]], weight: float = 0.9) -> list[tuple[float, float]]:
    """An exponential moving average, debiased at the start (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, (x, y) in enumerate(points, start=1):
        average = weight * average + (1 - weight) * y
        out.append((x, average / (1 - weight**i)))
    return out


def run_view(folder: str | Path) -> tuple[Image.Image, Image.Image, Image.Image, Image.Image | None, str]:
    """(loss plot: raw and smoothed, held-out plot, learning-rate plot, the latest validation grid or None, a
    status line) of a training output folder."""
    from diffbase.plot import line_plot
    from diffbase.training.metrics import metric_names, read_metrics

    out = Path(folder)
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{out}: no metrics.jsonl (a `diffbase train` output folder has one once training starts)")
    rows = read_metrics(metrics)  # a line a live run is still writing is left out

    def series(name: str) -> list[tuple[float, float]]:
        return [(r["step"], r[name]) for r in rows if name in r and "step" in r]

    loss = series("loss")
    smooth = smoothed(loss)
    logged = sorted({k for r in rows for k in r if k.startswith("val_")})
    names = set(metric_names())
    scores = {n: series(n) for n in logged if n in names}  # other scales (PSNR in dB): in the status line
    held = {n: series(n) for n in logged if n not in names}
    plot = line_plot({"loss": loss, "smoothed": smooth} if loss else {}, title=f"{out.name}: training loss")
    held_plot = line_plot(held, title="held-out (validation)")
    lr_plot = line_plot({"learning rate": series("lr")}, title="learning rate")
    grids = sorted((out / "validation").glob("step-*.png")) if (out / "validation").is_dir() else []
    grid = Image.open(grids[-1]).convert("RGB") if grids else None
    last = max((r["step"] for r in rows if "step" in r), default=0)
    if grids:
        shown = f"{len(grids)} validation grid(s), latest {grids[-1].name}"
    else:
        shown = "no validation grid yet (the config's training.validation makes one at its `every` steps and the end)"
    latest = f"; loss {loss[-1][1]:.4f} (smoothed {smooth[-1][1]:.4f})" if loss else ""
    latest += "".join(f"; {n} {values[-1][1]:.4g}" for n, values in scores.items())
    return plot, held_plot, lr_plot, grid, f"step {last}{latest}; {shown}"


def loss_view(folder: str) -> tuple[Image.Image, Image.Image | None, str]:
    """(loss plot, latest validation grid or None, a status line): run_view's first plot, grid and status."""
    plot, _, _, grid, status = run_view(folder)
    return plot, grid, status


def monitor_tab(app: App) -> None:
    import gradio as gr

    def monitor(folder: str) -> tuple[Any, ...]:
        try:
            app.check_path(folder, MONITOR)
            return (*run_view(folder), "")
        except UserError as err:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"**error:** {user_message(err)}"

    with gr.Tab("Training monitor", id="monitor"):
        folder = gr.Textbox(label=MONITOR, value="outputs/demo/run")
        refresh = gr.Button("Refresh")
        status, error = gr.Markdown(), gr.Markdown(elem_id="monitor-status")
        with gr.Row():
            plot, held = gr.Image(label="loss", type="pil", format="png"), gr.Image(label="held-out", type="pil")
        with gr.Row():
            lr, grid = (gr.Image(label="learning rate", type="pil", format="png"),
                        gr.Image(label="latest validation grid", type="pil", format="png"))  # fmt: skip
        outputs = [plot, held, lr, grid, status, error]
        refresh.click(monitor, folder, outputs, api_name="monitor")
        timer = gr.Timer(10.0, active=False)
        live = gr.Checkbox(label="refresh every 10 s", value=False)
        live.change(lambda on: gr.Timer(active=on), live, timer)
        timer.tick(monitor, folder, outputs)


def experiment_configs() -> list[str]:
    """The experiment configs a page can start: the tiny, toy and demo ones (they run on a CPU)."""
    found = [p for kind in ("tiny", "toy", "demo") for p in sorted((CONFIGS / kind).glob("*.yaml"))]
    return [str(p.relative_to(CONFIGS.parents[1])) for p in found]


def start_job(app: App, configs: list[str], config: str, steps: float, lr: float, batch: float, every: float,
              val_every: float, held: float, data: str) -> tuple[str, Any]:  # fmt: skip
    """The Train tab's Start: (the status line, the new job's number for Stop / Resume)."""
    import gradio as gr

    from diffbase.interface import jobs as J

    try:
        if config not in configs:
            raise UserError(f"config: choose one of the listed experiments, not '{config}'")
        job = app.jobs.submit(str(CONFIGS.parents[1] / config), train_overrides(app, steps, lr, batch, every,
                                                                                val_every, held, data))  # fmt: skip
    except UserError as err:
        return f"**error:** {user_message(err)}", gr.skip()
    waiting = sum(1 for j in list(app.jobs.jobs) if j.state == J.WAITING) - 1  # no metrics read to count them
    ahead = "starting" if waiting <= 0 else f"waiting ({waiting} ahead in the queue)"
    return f"job {job.number}: {ahead}", job.number


def train_overrides(app: App, steps: float, lr: float, batch: float, every: float, val_every: float, held: float,
                    data: str) -> list[str]:  # fmt: skip
    """The Train tab's fields, checked, as config overrides."""
    from diffbase.interface import checks

    checks.count(steps, "max steps")
    checks.count(batch, "batch size")
    checks.count(every, "checkpoint every")
    checks.number(lr, "learning rate", low=0, low_open=True)
    checks.number(val_every, "validate every", low=0)
    checks.number(held, "held-out fraction", 0, 1, high_open=True)
    overrides = [f"training.max_steps={int(steps)}", f"training.learning_rate={float(lr)}",
                 f"training.batch_size={int(batch)}", f"training.checkpoint_every={int(every)}",
                 f"training.validation.every={int(val_every)}", f"training.validation.loss_split={float(held)}"]  # fmt: skip
    if data.strip():
        app.check_path(data, DATA)
        if not Path(data.strip()).exists():
            raise UserError(f"{DATA}: {data.strip()} not found")
        overrides.append(f"data.train_path={data.strip()}")
    return overrides


def job_action(app: App, action: str, number: float | None) -> str:
    """Stop or Resume the chosen job: the status line."""
    try:
        if number is None:
            raise UserError("job: choose a job number from the table")
        return app.jobs.stop(int(number)) if action == "stop" else app.jobs.resume(int(number))
    except UserError as err:
        return f"**error:** {user_message(err)}"


def job_view(app: App, number: float | None, shown: Any = None) -> tuple[Any, ...]:
    """The jobs table, the chosen (or latest) job's plots and grid, its status and last log line, and the key of
    what they were drawn from (the page's state, `shown`): while it is unchanged (the timer asks every 2 s), the
    plots, grid, status and log line are left as the page has them (gr.skip()), not read and drawn again."""
    import gradio as gr

    from diffbase.interface import jobs as J

    rows = app.jobs.rows()
    if not rows:
        return rows, None, None, None, None, "no jobs yet", "", None
    try:
        job = app.jobs.get(int(number) if number else rows[-1][0])
    except UserError as err:
        return rows, None, None, None, None, user_message(err), "", None
    key = J.view_key(job)
    if key == shown:
        return rows, *[gr.skip()] * 6, shown
    log = J.last_error(job.log) if job.log.is_file() else ""
    try:
        plot, held, lr, grid, status = run_view(job.out)
    except UserError:
        return rows, None, None, None, None, f"job {job.number}: {job.state} (no metrics yet)", log, key
    return rows, plot, held, lr, grid, f"job {job.number}: {job.state}; {status}", log, key


def train_tab(app: App) -> None:
    import functools

    import gradio as gr

    configs = experiment_configs()
    start, view = functools.partial(start_job, app, configs), functools.partial(job_view, app)

    with gr.Tab("Train", id="train"):
        gr.Markdown("Runs `diffbase train` on an experiment config, one job at a time (others wait). Stop saves a "
                    "checkpoint; Resume continues from it. A finished try-on, DreamFit or DreamO run's export "
                    "can be used in its tab.")  # fmt: skip
        with gr.Row():
            first = next((c for c in configs if c.endswith("tiny/sd15_lora.yaml")), configs[0] if configs else None)
            config = gr.Dropdown(configs, value=first, label="experiment config",
                                 elem_id="train-config")  # fmt: skip
            data = gr.Textbox(label=DATA, value="", placeholder="empty: the config's own")
        with gr.Row():
            steps = gr.Number(label="max steps", value=20, precision=0)
            lr = gr.Number(label="learning rate", value=1e-2)
            batch = gr.Number(label="batch size", value=2, precision=0)
            every = gr.Number(label="checkpoint every", value=10, precision=0)
            val_every = gr.Number(label="validate every (0: at the end)", value=10, precision=0)
            split = gr.Number(label="held-out fraction (its loss is plotted)", value=0.25)
        with gr.Row():
            go = gr.Button("Start", variant="primary", elem_id="train-start")
            number = gr.Number(label="job", value=None, precision=0, elem_id="train-job")
            stop = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="train-stop")
            resume = gr.Button("Resume", elem_id="train-resume")
            use = gr.Button("Use its export in its tab", elem_id="train-use")
        message = gr.Markdown(elem_id="train-status")
        table = gr.Dataframe(headers=["job", "config", "state", "step", "note", "output folder"], interactive=False,
                             elem_id="train-jobs")  # fmt: skip
        progress = gr.Markdown(elem_id="train-progress")
        with gr.Row():
            plot = gr.Image(label="loss (raw and smoothed)", type="pil", format="png")
            held = gr.Image(label="held-out loss", type="pil", format="png")
        with gr.Row():
            rate = gr.Image(label="learning rate", type="pil", format="png")
            grid = gr.Image(label="latest validation grid", type="pil", format="png")
        log = gr.Textbox(label="the job's last log line", lines=1)
        drawn = gr.State(None)  # the key of what this page's plots show (job_view draws again when it changes)
        shown = [table, plot, held, rate, grid, progress, log, drawn]
        go.click(start, [config, steps, lr, batch, every, val_every, split, data], [message, number],
                 api_name="train_start", queue=False).then(view, number, shown, queue=False)  # fmt: skip
        stop.click(lambda n: job_action(app, "stop", n), number, message, api_name="train_stop", queue=False)
        resume.click(lambda n: job_action(app, "resume", n), number, message, api_name="train_resume", queue=False)
        gr.Timer(2.0).tick(view, [number, drawn], shown, queue=False, show_progress="hidden")
        app.train_use = (use, number, message)  # wired once every tab exists (serve.use_export)


USES = {"vton": ("tryon", "weights"), "dreamo": ("dreamo", "dreamo"), "dreamfit": ("dreamfit", "checkpoint")}


def use_export(app: App, tabs: Any) -> None:
    """The Train tab's button: a finished run's export put in the field of the tab that runs it."""
    import gradio as gr

    from diffbase.interface.jobs import FINISHED, export_paths

    targets = [(key, name, field) for key, (name, field) in USES.items() if name in app.tabs]
    fields = [app.tabs[name].components[app.tabs[name].names.index(field)] for _, name, field in targets]

    def use(number: float | None) -> tuple[Any, ...]:
        skip = [gr.skip()] * len(fields)
        try:
            if number is None:
                raise UserError("job: choose a finished job's number")
            job = app.jobs.get(int(number))
            if job.state != FINISHED:
                raise UserError(f"job {job.number}: {job.state}; its export is used once it has finished")
            files = export_paths(job.out)
            for i, (key, name, _) in enumerate(targets):
                if key in files:
                    path = Path(files[key])
                    value = str(path.parent) if key == "dreamo" else str(path)
                    skip[i] = value
                    return (gr.Tabs(selected=name), f"job {job.number}: {key} export set in the {name} tab", *skip)
            raise UserError(f"job {job.number}: no tab runs its exports ({', '.join(files) or 'none'})")
        except UserError as err:
            return (gr.skip(), f"**error:** {user_message(err)}", *skip)

    button, number, message = app.train_use
    button.click(use, number, [tabs, message, *fields], queue=False)


def gallery_tab(app: App, tabs: Any) -> None:
    """The session's results, newest first: the selected one's settings, its file and "use these settings"."""
    import gradio as gr

    with gr.Tab("Gallery", id="gallery"):
        app.outputs[1].render()
        with gr.Row():
            chosen = gr.JSON(label="settings of the selected image", elem_id="gallery-settings")
            download = gr.File(label="download (PNG with its settings)", elem_id="gallery-file")
        again = gr.Button("Use these settings again", elem_id="gallery-again")
        picked = gr.State(None)

    def select(state: list[dict[str, Any]], evt: gr.SelectData) -> tuple[Any, ...]:
        entries = list(reversed(state or []))  # shown newest first
        if evt.index is None or not 0 <= evt.index < len(entries):
            return None, None, None
        entry = entries[evt.index]
        return entry, {"tab": entry["title"], **entry["settings"]}, entry["path"]

    select.__annotations__ = {"evt": gr.SelectData}
    app.outputs[1].select(select, app.outputs[0], [picked, chosen, download], queue=False)
    names = list(app.tabs)
    components = [c for name in names for c in app.tabs[name].components]

    def restore(entry: dict[str, Any] | None) -> tuple[Any, ...]:
        values: list[Any] = []
        for name in names:
            info = app.tabs[name]
            for field_name in info.names:
                mine = entry is not None and entry["tab"] == name and field_name in entry["settings"]
                values.append(entry["settings"][field_name] if mine else gr.skip())
        return (gr.Tabs(selected=entry["tab"]) if entry else gr.skip(), *values)

    again.click(restore, picked, [tabs, *components], queue=False)


def tabs() -> list[Callable[[App], None]]:
    """Every method package's tab (its ui.py), in the methods' order, then Train and the training monitor."""
    from diffbase import methods

    found = [methods.part(package, "ui") for package in methods.packages()]
    return [ui.tab for ui in found if ui is not None] + [train_tab, monitor_tab]


def build_app(defaults: Defaults, limits: Limits) -> Any:
    import gradio as gr

    from diffbase.interface.gallery import Gallery
    from diffbase.interface.jobs import Jobs
    from diffbase.interface.web import toy_editors
    from diffbase.runtime import resolve

    rt = resolve(defaults.device, defaults.dtype, defaults.attention, defaults.offload, quantize=defaults.quantize,
                 offload_blocks=defaults.offload_blocks, compile_on=defaults.compile)  # once, every tab  # fmt: skip
    rt.use_attention([])  # the process's SDPA kernels (a diffusers backend name needs the models: the CLI's)
    out = Path(defaults.out)
    if defaults.models_root and not Path(defaults.models_root).is_dir():
        raise UserError(f"--models-root: {defaults.models_root} is not a folder")
    toy_editors(out / "zoo")
    app = App(defaults, limits, Models(), rt, gr.Progress(track_tqdm=True), Gallery(out / "gallery"))
    app.jobs = Jobs(out, cwd=Path.cwd())
    with gr.Blocks(title="diffbase", delete_cache=(600, 3600)) as blocks:
        gr.Markdown("# diffbase\nLocal models only; the defaults are the shipped toy models (tiny, CPU-friendly) "
                    "and examples, so every tab runs on its first click.")  # fmt: skip
        app.outputs = [gr.State([]), gr.Gallery(label="this session's results", columns=6, height=360,
                                                elem_id="gallery", render=False, format="png")]  # fmt: skip
        with gr.Tabs() as tab_row:
            for tab in tabs():
                tab(app)
            gallery_tab(app, tab_row)
        use_export(app, tab_row)

        def closed(req: gr.Request) -> None:
            app.gallery.forget(getattr(req, "session_hash", "") or "")

        closed.__annotations__ = {"req": gr.Request}
        blocks.unload(closed)
    blocks.queue(default_concurrency_limit=1, max_size=16)
    blocks.diffbase = app  # the tabs' handlers (app.tabs), the jobs and the gallery, for tests and scripts
    return blocks


def is_local(host: str) -> bool:
    """The host names only this machine (loopback)."""
    return host in LOOPBACK or host.startswith("127.")


def check_host(host: str, auth: list[tuple[str, str]]) -> None:
    """Beyond this machine only with a password: anyone on the network could otherwise read and run."""
    if not is_local(host) and not auth:
        raise UserError(f"--host {host}: binding beyond this machine needs --auth USER:PASS or --auth-file FILE "
                        "(without them, anyone who can reach the port can use the server)")  # fmt: skip


def read_auth(pairs: list[str], file: str | None) -> list[tuple[str, str]]:
    """USER:PASS pairs from --auth and from --auth-file (one a line; # comments)."""
    lines = list(pairs)
    if file:
        path = Path(file)
        if not path.is_file():
            raise UserError(f"--auth-file: {file} not found")
        lines += [x.strip() for x in path.read_text().splitlines() if x.strip() and not x.strip().startswith("#")]
    out = []
    for line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            where = "--auth-file" if line not in pairs else "--auth"
            raise UserError(f"{where}: expected USER:PASS with neither empty")
        out.append((user, password))
    return out


def serve(host: str = "127.0.0.1", port: int = 7860, defaults: Defaults | None = None, limits: Limits | None = None,
          block: bool = True, auth: list[tuple[str, str]] | None = None) -> Any:  # fmt: skip
    check_host(host, auth or [])
    defaults = defaults or Defaults()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TEMP_DIR", str((Path(defaults.out) / ".uploads").absolute()))
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("diffbase serve needs gradio: pip install 'diffbase[ui]'") from None
    limits = limits or Limits()
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # decoding anything larger fails (header checks come first)
    app = build_app(defaults, limits)
    import atexit

    atexit.register(app.diffbase.jobs.close)  # a running training job stops and saves a checkpoint
    print(f"diffbase web UI on http://{host}:{port} (uploads up to {limits.max_bytes / 2**20:.0f} MB, "
          f"{limits.max_pixels} pixels)", flush=True)  # fmt: skip
    if not is_local(host):
        print("note: reachable from the network with a password but without TLS; put it behind HTTPS to keep "
              "the password private", flush=True)  # fmt: skip
    allowed = [str(p) for p in (ZOO, EXAMPLES, Path(defaults.out)) if p.exists()]
    app.launch(server_name=host, server_port=port, max_file_size=limits.max_bytes, prevent_thread_lock=not block,
               show_error=True, quiet=True, ssr_mode=False, auth=auth or None, allowed_paths=allowed)  # fmt: skip
    return app


def run_serve(args: argparse.Namespace) -> None:
    if min(args.max_upload_mb, args.max_pixels, args.max_seconds, args.max_tiles) <= 0:
        raise UserError("--max-upload-mb / --max-pixels / --max-seconds / --max-tiles: expected positive limits")
    auth = read_auth(args.auth or [], args.auth_file)  # --host and --models-root: checked by serve, before building
    defaults = Defaults(tryon_weights=args.tryon_weights or "", device=args.device, dtype=args.dtype,
                        attention=args.attention, quantize=args.quantize, offload=args.offload,
                        offload_blocks=args.offload_blocks, compile=args.compile, out=args.out,
                        models_root=args.models_root or "")  # fmt: skip
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_pixels, args.max_seconds, args.max_tiles)
    serve(args.host, args.port, defaults, limits, auth=auth)


def add_parsers(sub: Any) -> None:
    """`diffbase serve` and its flags."""
    from diffbase.runtime import add_arguments

    web = sub.add_parser("serve", help="the web UI (Gradio): try-on, DreamFit, DreamO, edit, upscale, training")
    web.add_argument("--host", default="127.0.0.1",
                     help="the address to bind (0.0.0.0 exposes it to your network; then --auth is required)")  # fmt: skip
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--auth", action="append", metavar="USER:PASS", help="a login the page asks for (repeatable)")
    web.add_argument("--auth-file", metavar="FILE", help="logins, one USER:PASS a line")
    web.add_argument("--models-root", metavar="DIR",
                     help="every path field must be under DIR (the shipped toys and --out are allowed too)")  # fmt: skip
    web.add_argument("--out", default="outputs/serve",
                     help="the gallery, training runs started from the page and the toy edit models")  # fmt: skip
    add_arguments(web)
    web.add_argument("--tryon-weights", help="the try-on tab's default weights (e.g. outputs/demo/run/vton)")
    web.add_argument("--max-upload-mb", type=float, default=20.0, help="uploads larger than this are refused")
    web.add_argument("--max-pixels", type=int, default=4096 * 4096, help="images with more pixels are refused")
    web.add_argument("--max-seconds", type=float, default=600.0, help="one request's time limit (it stops at a step)")
    web.add_argument("--max-tiles", type=int, default=64, help="the upscale tab's limit on tiles per request")
    web.set_defaults(func=run_serve)
