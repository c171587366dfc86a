"""MuseTalk Studio in the browser: upload or speak, preview, generate, compare side by side.

Only the UI lives here: every event calls ``musetalk.studio`` and has an ``api_name``, so the
app is an API for ``gradio_client`` too. Models load once, in ``main()``; importing this file
loads nothing heavy (not even Gradio).

    python app.py [--host 0.0.0.0] [--port 7860] [--models-dir DIR] [--device auto]

Limits and folders come from the MUSETALK_* variables listed in ``musetalk.studio.ENVIRONMENT``
(the flags below override them).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import inspect
import logging
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from musetalk import live_ice
from musetalk import studio as studio_lib
from musetalk.config import RunOptions
from musetalk.errors import MuseTalkError
from musetalk.studio import Speech, Studio, StudioConfig

logger = logging.getLogger("musetalk.app")

TITLE = "MuseTalk Studio"
FACE_CHOICES = [("The largest face", "largest"), ("1st from the left", "0"), ("2nd from the left", "1"),
                ("3rd from the left", "2"), ("4th from the left", "3")]
MASK_CHOICES = [("Official for the version (v1.5: jaw, v1.0: raw)", "official"),
                ("Jaw: lower face to the jaw line, cheeks narrowed (v1.5)", "jaw"),
                ("Raw: lower face as segmented (v1.0)", "raw"),
                ("Mouth: lips and a margin (keeps a beard or moustache)", "mouth")]
LOOP_CHOICES = [("Forward and back (ping-pong)", "pingpong"), ("From the start again", "loop"),
                ("Hold the last frame", "freeze")]
LENGTH_CHOICES = [("As long as the audio", "audio"), ("As long as the video", "video")]
VERSION_CHOICES = [("MuseTalk 1.5", "v15"), ("MuseTalk 1.0", "v1")]
ENGINE_CHOICES = [("MuseTalk (the model; a GPU makes it fast)", "musetalk"),
                  ("MuseTalk draft (a tiny decoder: several times faster, less detail)", "draft"),
                  ("Preview (no weights, real time on a CPU; a sketch of the mouth)", "preview")]
SPEECH_FROM = [("Audio file or recording", "audio"), ("Text", "text")]
# The comparison table's first rows: MuseTalk beside the preview engine when the weights are
# here, else two masks (with the preview engine chosen for the job).
ENGINE_VARIANTS = [["MuseTalk", "", "", "", "", "", "musetalk"], ["Preview engine", "", "", "", "", "", "preview"]]
MASK_VARIANTS = [["Jaw mask", "", "", "", "jaw", "", ""], ["Lips only", "", "", "", "mouth", "", ""]]
# ZeroGPU attaches a GPU only inside functions marked with spaces.GPU, for at most this long.
GPU_SECONDS = 300
VIDEO_HEIGHT = 360  # pixels a result player takes on the page (the file keeps its own size)
CSS = """
#status {font-size: 0.9em}
#preview-image img {object-fit: contain}
"""
INTRO = """# MuseTalk Studio
Give a video (or a photo) of a face and new speech; get the same video with the lips speaking
the new audio and everything else untouched. **Preview** checks the crop and the mask on the first
frame in a second, **Generate** makes the dub, the **Compare** tab runs several variants side by side."""


# --------------------------------------------------------------------------- plain functions


def run_options(version, extra_margin, bbox_shift, mask_mode, left_cheek_width, right_cheek_width, face,
                smoothing=0.5, length="audio", loop="pingpong", silence_gate=True, batch_size=0,
                quality=18) -> RunOptions:
    """RunOptions from the controls' values (sliders give floats, the face menu strings; batch size 0: automatic)."""
    face_index = None if face in (None, "", "largest") else int(face)
    return RunOptions(
        version=version, extra_margin=int(extra_margin), bbox_shift=int(bbox_shift),
        parsing_mode=None if mask_mode in (None, "", "official") else mask_mode,
        left_cheek_width=int(left_cheek_width), right_cheek_width=int(right_cheek_width), face_index=face_index,
        smoothing=float(smoothing), length=length, loop=loop, silence_gate=bool(silence_gate),
        batch_size=int(batch_size) or None, crf=int(quality),
    ).validate()


def variant_label(speech_from, voice, engine, version, mask_mode) -> str:
    """A short name for a comparison row: the engine, then only what is not the default."""
    parts = [{"musetalk": "MuseTalk", "draft": "draft", "preview": "preview"}.get(engine, engine)]
    if speech_from == "text" and voice:
        parts.append(voice)
    if version != "v15":
        parts.append(version)
    if mask_mode not in ("official", "", None):
        parts.append(f"{mask_mode} mask")
    return ", ".join(parts)


def speech_request(speech_from, audio, text, source, voice, clone_voice) -> Speech:
    """The job's speech from the speech controls: only the chosen kind is passed on."""
    if speech_from == "text":
        return Speech(text=text or "", source=source or None, voice=voice or None, clone=bool(clone_voice))
    return Speech(audio=audio or None)


def speech_sources() -> tuple[dict, list[str]]:
    """Usable audio sources by id, and a line for each one that is not (with what to do)."""
    from musetalk import plugins

    usable, notes = {}, []
    for source_id, source in plugins.audio_sources().items():
        ok, reason = source.available()
        if ok is not False:  # None: not known until tried (an online service): offered, with its note
            usable[source_id] = source
        if ok is not True:
            notes.append(f"{source.label}: {reason}")
    notes += [f"plugin problem: {line}" for line in plugins.plugin_problems()]
    return usable, notes


def voice_choices(source) -> tuple[list[tuple[str, str]], str | None]:
    """(menu entries, default voice id) of a source."""
    if source is None:
        return [], None
    voices = source.voices()
    choices = [(f"{voice.label} ({voice.id})" if voice.label != voice.id else voice.id, voice.id) for voice in voices]
    default = source.default_voice or (voices[0].id if voices else None)
    return choices, default


# What the library's messages say to a command-line user, as a web user acts on it: the form's controls,
# or the studio's operator for what only the server can change.
WEB_WORDS = [
    # The scoring weights are not among the button's: fetching them is the server's business.
    (re.compile(r"[:;,]?\s*(?:fetch them with: )?`?musetalk download --scoring`?"),
     " on this server (its operator can fetch them)"),
    (re.compile(r"`?musetalk download[^`;.,)]*`?"), "the Download weights button"),
    (re.compile(r"\(?--device cpu\)?|--device cpu or auto"), "(the studio's operator can run it on the CPU)"),
    (re.compile(r"--face-index"), "the Face to dub menu (Advanced options)"),
    (re.compile(r"--clone-voice"), "Clone the voice from the video"),
    (re.compile(r"--text-file|--text"), "the Text box"),
    (re.compile(r"--source"), "the Speech source menu"),
    (re.compile(r"--engine"), "the Engine choice"),
    (re.compile(r"--version"), "the Model version menu"),
    (re.compile(r"--[a-z][a-z0-9-]+"), "the matching option of the form"),
]
# An absolute path (an upload's, or the server's own folders): only its last part is the user's.
SERVER_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/:;,()]+/)+([^\s'\"/:;,()]+)")


def for_the_web(message: str) -> str:
    """A library message as a web user reads it: file names without server folders, controls instead of
    command-line flags."""
    message = SERVER_PATH.sub(lambda match: match.group(1), message)
    for pattern, words in WEB_WORDS:
        message = pattern.sub(words, message)
    return message


def web_table(rows: list[list]) -> list[list]:
    """A table's rows with their words as a web user reads them (a score's "n/a" says why)."""
    return [[for_the_web(cell) if isinstance(cell, str) else cell for cell in row] for row in rows]


def user_errors(function):
    """Errors a person can act on reach the page (and API clients) as their message, in the page's words;
    anything else is logged with its trace and shown as one line, never as a trace. Generator functions
    (jobs that stream progress and their first segments) are wrapped as generators."""
    import gradio as gr

    def for_people(error: Exception) -> gr.Error:
        if isinstance(error, gr.Error):
            return error
        if isinstance(error, MuseTalkError):
            # duration None: the message stays until closed (a long job's failure is easy to miss).
            return gr.Error(for_the_web(str(error)), duration=None, print_exception=False)
        logger.error("unexpected failure in %s", function.__name__, exc_info=error)
        return gr.Error(f"Something went wrong inside the studio ({type(error).__name__}: "
                        f"{for_the_web(str(error))}). The server log has the details; please report it.",
                        duration=None, print_exception=False)

    if inspect.isgeneratorfunction(function):
        @functools.wraps(function)
        def generator(*args, **kwargs):
            try:
                return (yield from function(*args, **kwargs))
            except Exception as error:
                raise for_people(error) from None

        return generator

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as error:
            raise for_people(error) from None

    return wrapper


def streaming_available() -> bool:
    """Gradio plays a result while it is made (HLS) with the ffmpeg and ffprobe of the system's PATH."""
    return bool(shutil.which("ffmpeg") and shutil.which("ffprobe"))


def on_gpu(function):
    """On a ZeroGPU Space the GPU is attached only inside functions marked with ``spaces.GPU``;
    elsewhere (and without the ``spaces`` package) the function is returned as it is."""
    try:
        import spaces
    except ImportError:
        return function
    return spaces.GPU(duration=GPU_SECONDS)(function)


def status_text(services: Studio) -> str:
    # No server paths on the page: it may be public (the folder is in the server's log and --help).
    lines = ["**Weights:**", *[f"- {line}" for line in services.weights_status().splitlines()]]
    if services.missing_weights():
        lines += ["", "Without the MuseTalk weights the **preview engine** is chosen below: it needs none. "
                      "*Download weights* (or choose MuseTalk and generate) to use the model."]
    elif not services.has_gpu():
        estimate = services.musetalk_estimate(10.0)
        lines += ["", "No GPU here: the **preview engine** (real time) is chosen below. MuseTalk is one click away: "
                  + (f"{estimate} for each 10 s of video on this CPU (measured)." if estimate
                     else "its time on this CPU is being measured; refresh the page in a moment.")]
    _, notes = speech_sources()
    if notes:
        lines += ["", "**Speech sources not available:**", *[f"- {note}" for note in notes]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the page


def live_tab(services: Studio, demo) -> None:
    """The Live tab: the live page's widgets (``musetalk.live_page``, the same as ``musetalk live``), or what
    to install for them."""
    import gradio as gr

    from musetalk import live_rtc

    ready, reason = live_rtc.available()
    if not ready:
        gr.Markdown(f"**Live is not available here**: {reason}", elem_id="live-missing")
        return
    from musetalk.live_page import build_live_tab

    build_live_tab(services, services.live_registry, user_errors=user_errors, demo=demo)


def build_demo(services: Studio):
    """The Blocks app around ``services`` (a Studio whose models are loaded, or load on first use)."""
    import gradio as gr

    sources, _ = speech_sources()
    default_source = "espeak" if "espeak" in sources else next(iter(sources), None)
    voices, default_voice = voice_choices(sources.get(default_source))
    defaults = RunOptions(version=services.config.version)
    default_engine = services.default_engine()
    streaming = streaming_available()

    with gr.Blocks(title=TITLE, delete_cache=(3600, int(services.config.keep_minutes * 60))) as demo:
        history = gr.State([])
        gr.Markdown(INTRO)
        with gr.Row():
            status = gr.Markdown(status_text(services), label="Weights and engines", show_label=False,
                                 elem_id="status")
            with gr.Column(scale=0, min_width=200):
                download = gr.Button("Download weights", size="sm")

        with gr.Tab("Studio", id="studio"):
            with gr.Row():
                with gr.Column(scale=5):
                    video = gr.File(label="Face video or photo", file_types=["video", "image"], type="filepath",
                                    elem_id="video-upload")
                    speech_from = gr.Radio(SPEECH_FROM, value="audio", label="New speech from", elem_id="speech-from")
                    with gr.Group(visible=True) as audio_group:
                        audio = gr.Audio(label="Speech: upload a file or record", sources=["upload", "microphone"],
                                         type="filepath", elem_id="speech-audio")
                    with gr.Group(visible=False) as text_group:
                        text = gr.Textbox("", label="Text to speak", lines=3, max_lines=12, elem_id="speech-text",
                                          placeholder="Type what the face should say.",
                                          max_length=services.config.max_text_chars)
                        with gr.Row():
                            # Custom values pass: the API may name any installed source or voice, and the
                            # library's own message says what is wrong with one that does not exist.
                            source = gr.Dropdown([(s.label, s.id) for s in sources.values()], value=default_source,
                                                 label="Speech source", elem_id="speech-source", allow_custom_value=True)
                            voice = gr.Dropdown(voices, value=default_voice, label="Voice", elem_id="speech-voice",
                                                allow_custom_value=True)
                        clone_voice = gr.Checkbox(label="Clone the voice from the video", value=False,
                                                  visible=bool(default_source and sources[default_source].can_clone))
                    engine = gr.Radio(ENGINE_CHOICES, value=default_engine, label="Engine", elem_id="engine")
                    with gr.Accordion("Advanced options", open=False, elem_id="advanced-options"):
                        with gr.Row():
                            version = gr.Dropdown(VERSION_CHOICES, value=defaults.version, label="Model version")
                            face = gr.Dropdown(FACE_CHOICES, value="largest", label="Face to dub")
                        mask_mode = gr.Radio(MASK_CHOICES, value="official", label="Blend mask", elem_id="mask-mode")
                        with gr.Row():
                            extra_margin = gr.Slider(0, 60, value=defaults.extra_margin, step=1, precision=0,
                                                     label="Extra margin below the chin (v1.5, px)")
                            bbox_shift = gr.Slider(-40, 40, value=defaults.bbox_shift, step=1, precision=0,
                                                   label="Box shift (v1.0; + opens the mouth more)")
                        with gr.Row():
                            left_cheek_width = gr.Slider(0, 256, value=defaults.left_cheek_width, step=1, precision=0,
                                                         label="Left cheek width (jaw mask)")
                            right_cheek_width = gr.Slider(0, 256, value=defaults.right_cheek_width, step=1, precision=0,
                                                          label="Right cheek width (jaw mask)")
                        with gr.Row():
                            length = gr.Radio(LENGTH_CHOICES, value=defaults.length, label="Output length")
                            loop = gr.Radio(LOOP_CHOICES, value=defaults.loop, label="Audio longer than the video")
                        with gr.Row():
                            silence_gate = gr.Checkbox(value=defaults.silence_gate,
                                                       label="Silence gate: mouth rests in pauses")
                            smoothing = gr.Slider(0, 1, value=defaults.smoothing, step=0.05,
                                                  label="Face tracking smoothing")
                        with gr.Row():
                            batch_size = gr.Slider(0, 64, value=defaults.batch_size or 0, step=1, precision=0,
                                                   label="Batch size (frames per model call; 0: what the GPU holds)")
                            quality = gr.Slider(0, 51, value=defaults.crf, step=1, precision=0,
                                                label="Output quality (CRF: 0 best, 18 visually lossless, 51 worst)")
                        measure = gr.Checkbox(value=True, label="Measure the results (lip-sync, silence, identity)",
                                              elem_id="measure")
                    with gr.Row():
                        preview_button = gr.Button("Preview crop and mask", elem_id="preview-button")
                        generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")

                with gr.Column(scale=7):
                    with gr.Tabs():
                        with gr.Tab("Result", id="result"):
                            preview_image = gr.Image(label="Preview: crop box (yellow), paste-back square (blue), "
                                                           "redrawn area (green)", type="numpy", interactive=False,
                                                     height=300, elem_id="preview-image")
                            preview_note = gr.Markdown(label="What the preview shows", show_label=False)
                            stream_video = gr.Video(label="The dub, playing while it is made", streaming=True,
                                                    autoplay=True, interactive=False, height=VIDEO_HEIGHT,
                                                    visible=streaming, elem_id="stream-video")
                            result_video = gr.Video(label="Dubbed video", interactive=False, height=VIDEO_HEIGHT,
                                                    elem_id="result-video")
                            # The composed videos carry their own labels: Gradio's would cover them.
                            gr.Markdown("**Side by side with the original** (the dub's sound)")
                            side_video = gr.Video(label="Side by side", show_label=False, interactive=False,
                                                  elem_id="side-by-side-video")
                            summary = gr.Markdown(label="Summary", elem_id="result-summary")
                            timings = gr.Dataframe(headers=["stage", "seconds", "frames per second"], interactive=False,
                                                   label="What the run took", elem_id="timings")
                            scores = gr.Dataframe(headers=["score", "value", "good"], interactive=False,
                                                  label="Scores of the result", elem_id="scores")
                        with gr.Tab("Compare", id="compare"):
                            gr.Markdown(
                                f"Up to {services.config.max_variants} variants of this job on the same video. An "
                                "empty cell keeps what is set on the left. *speech source*: `audio` for the audio "
                                "above, or a source id (`espeak`, ...) to speak the text; *voice*: a voice id; "
                                "*version*: `v15` or `v1`; *mask*: `official`, `jaw`, `raw` or `mouth`; *engine*: `musetalk`, "
                                "`draft` or `preview`. The face data of the video is prepared once and reused by every variant.")
                            variants = gr.Dataframe(value=ENGINE_VARIANTS if default_engine == "musetalk" else MASK_VARIANTS,
                                                    headers=studio_lib.VARIANT_COLUMNS,
                                                    datatype="str", type="array", interactive=True,
                                                    label="Variants", elem_id="variants")
                            with gr.Row():
                                add_variant = gr.Button("Add the current settings", size="sm", elem_id="add-variant")
                                clear_variants = gr.Button("Clear", size="sm", elem_id="clear-variants")
                                compare_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
                            gr.Markdown("**Comparison** (the first variant's sound)")
                            grid_video = gr.Video(label="Comparison", show_label=False, interactive=False,
                                                  elem_id="grid-video")
                            comparison = gr.Dataframe(headers=studio_lib.COMPARISON_COLUMNS, label="One row per variant",
                                                      interactive=False, elem_id="comparison-table")
                            variant_files = gr.File(label="Each variant's video", file_count="multiple",
                                                    interactive=False)
                        with gr.Tab("History", id="history"):
                            history_table = gr.Dataframe(headers=["time", "kind", "label", "summary"], interactive=False,
                                                         label="Results of this browser session", elem_id="history")
                            history_downloads = gr.File(label="Their files", file_count="multiple", interactive=False)
                            refresh_history = gr.Button("Refresh", size="sm", elem_id="refresh-history")
        with gr.Tab("Live", id="live"):
            live_tab(services, demo)

        option_inputs = [version, extra_margin, bbox_shift, mask_mode, left_cheek_width, right_cheek_width, face,
                         smoothing, length, loop, silence_gate, batch_size, quality]
        job_inputs = [speech_from, audio, text, source, voice, clone_voice, engine]

        # ------------------------------------------------------------- handlers

        def refresh_status():
            return status_text(services)

        def download_weights(version, progress=gr.Progress(track_tqdm=True)):
            services.fetch_weights(version, lambda fraction, text: progress(fraction, desc=text))
            return status_text(services)

        def show_job_inputs(speech_from):
            return gr.Group(visible=speech_from == "audio"), gr.Group(visible=speech_from == "text")

        def voices_of(source):
            choices, default = voice_choices(sources.get(source))
            can_clone = bool(source in sources and sources[source].can_clone)
            return gr.Dropdown(choices=choices, value=default), gr.Checkbox(visible=can_clone, value=False)

        def preview(video, version, extra_margin, bbox_shift, mask_mode, left_cheek_width, right_cheek_width, face):
            options = run_options(version, extra_margin, bbox_shift, mask_mode, left_cheek_width,
                                  right_cheek_width, face)
            shown = services.preview(video, options)
            return shown.image, shown.message

        def generate(video, speech_from, audio, text, source, voice, clone_voice, engine, version, extra_margin,
                     bbox_shift, mask_mode, left_cheek_width, right_cheek_width, face, smoothing, length, loop,
                     silence_gate, batch_size, quality, measure, history, progress=gr.Progress()):
            options = run_options(version, extra_margin, bbox_shift, mask_mode, left_cheek_width, right_cheek_width,
                                  face, smoothing, length, loop, silence_gate, batch_size, quality)
            speech = speech_request(speech_from, audio, text, source, voice, clone_voice)
            stream_dir = services.jobs.new("stream") if streaming else None
            work = functools.partial(services.generate, video, speech, options, score=bool(measure), engine=engine,
                                     stream_dir=stream_dir)
            # The job runs in its own thread; this one shows its progress and plays its first segments.
            # Gradio has read each segment by the time the generator resumes, so the segments'
            # folder goes when the job ends, however it ends (a failure, a client who left).
            try:
                for kind, value in studio_lib.watch(lambda report: work(progress=report), stream_dir):
                    if kind == "progress":
                        progress(value[0], desc=value[1])
                    elif kind == "segment":
                        yield value, *[gr.skip()] * 5
                    else:
                        job = value
            finally:
                if stream_dir is not None:
                    services.jobs.discard(stream_dir)
            history = studio_lib.history_add(history, "dub", f"{job.result.engine}: {job.speech}", [job.output],
                                             job.summary())
            yield gr.skip(), job.output, job.summary(), job.timing_rows(), web_table(job.score_rows()), history

        def side_by_side(video, dubbed, loop, history, progress=gr.Progress()):
            # First the page's old side-by-side goes: it belongs to the dub before this one.
            yield None, gr.skip()
            made = services.side_by_side(video, dubbed, loop, lambda fraction, what: progress(fraction, desc=what))
            history = studio_lib.history_add(history, "side-by-side", "the dub beside the original", [made.path],
                                             f"{made.num_frames} frames, {made.width}x{made.height}")
            yield made.path, history

        def add_current(variants, speech_from, source, voice, engine, version, mask_mode, extra_margin):
            rows = [row for row in (variants or []) if any(str(cell or "").strip() for cell in row)]
            if len(rows) >= services.config.max_variants:
                raise gr.Error(f"a comparison holds up to {services.config.max_variants} variants; "
                               "clear some rows first", print_exception=False)
            speech_cell = studio_lib.AUDIO_SOURCE_CELL if speech_from == "audio" else (source or "")
            voice_cell = (voice or "") if speech_from == "text" else ""
            # Every cell written out: an empty one would follow the left column when it changes later.
            cells = [speech_cell, voice_cell, version, mask_mode, str(int(extra_margin)), engine]
            for number, row in enumerate(rows, start=1):
                if [str(cell or "").strip() for cell in list(row)[1:7]] == cells:
                    gr.Warning(f"Not added: row {number} ({row[0]}) already has these settings; change one first.")
                    return rows
            return rows + [[variant_label(speech_from, voice, engine, version, mask_mode), *cells]]
        def clear():
            return []

        def compare(video, speech_from, audio, text, source, voice, clone_voice, engine, version, extra_margin,
                    bbox_shift, mask_mode, left_cheek_width, right_cheek_width, face, smoothing, length, loop,
                    silence_gate, batch_size, quality, measure, variants, history,
                    progress=gr.Progress(track_tqdm=True)):
            options = run_options(version, extra_margin, bbox_shift, mask_mode, left_cheek_width, right_cheek_width,
                                  face, smoothing, length, loop, silence_gate, batch_size, quality)
            speech = speech_request(speech_from, audio, text, source, voice, clone_voice)
            chosen = studio_lib.variants_from_rows(variants or [], speech, options, engine)
            made = services.compare(video, chosen, lambda fraction, what: progress(fraction, desc=what),
                                    score=bool(measure))
            files = [made.grid] + [job.output for job in made.results]
            summary = f"{len(made.results)} variants: " + "; ".join(job.label for job in made.results)
            history = studio_lib.history_add(history, "comparison", summary, files, f"sound of {made.audio_from}")
            table = {"headers": made.table_headers(), "data": web_table(made.table_rows())}
            return made.grid, table, [job.output for job in made.results], history

        # ------------------------------------------------------------- events

        light = {"concurrency_limit": None}  # quick UI updates never wait behind a dub
        gpu = {"concurrency_id": "gpu", "concurrency_limit": 1}  # one model job at a time
        demo.load(user_errors(refresh_status), outputs=status, api_name="status", **light)
        download.click(user_errors(download_weights), inputs=version, outputs=status, api_name="download_weights",
                       **gpu)
        speech_from.change(show_job_inputs, inputs=speech_from, outputs=[audio_group, text_group],
                           api_name="speech_from", **light)
        source.change(user_errors(voices_of), inputs=source, outputs=[voice, clone_voice], api_name="voices", **light)
        preview_button.click(
            user_errors(preview),
            inputs=[video, version, extra_margin, bbox_shift, mask_mode, left_cheek_width, right_cheek_width, face],
            outputs=[preview_image, preview_note], api_name="preview", concurrency_id="preview", concurrency_limit=2,
        )
        # Each job returns its own results; the session's history has an endpoint of its own.
        show_history = {"fn": history_views, "inputs": history, "outputs": [history_table, history_downloads],
                        **light}
        # The side-by-side is made once the dub is there, outside the model job's slot (the next job
        # need not wait for it). A new Generate clears the last one; one that comes in while the next
        # job runs is that of the dub still shown, and goes when the next side-by-side starts.
        dubbed = generate_button.click(
            user_errors(on_gpu(generate)), inputs=[video, *job_inputs, *option_inputs, measure, history],
            outputs=[stream_video, result_video, summary, timings, scores, history], api_name="generate",
            **gpu,
        )
        dubbed.then(**show_history, api_name=False)
        beside = dubbed.success(
            user_errors(side_by_side), inputs=[video, result_video, loop, history], outputs=[side_video, history],
            api_name="side_by_side", concurrency_id="side_by_side", concurrency_limit=1,
        )
        beside.then(**show_history, api_name=False)
        generate_button.click(lambda: None, outputs=side_video, api_name=False, **light)
        add_variant.click(user_errors(add_current),
                          inputs=[variants, speech_from, source, voice, engine, version, mask_mode, extra_margin],
                          outputs=variants, api_name="add_variant", **light)
        clear_variants.click(clear, outputs=variants, api_name="clear_variants", **light)
        compare_button.click(
            user_errors(on_gpu(compare)),
            inputs=[video, *job_inputs, *option_inputs, measure, variants, history],
            outputs=[grid_video, comparison, variant_files, history], api_name="compare", **gpu,
        ).then(**show_history, api_name=False)
        refresh_history.click(**show_history, api_name="history")
    return demo


def history_views(history: list[dict]) -> tuple:
    """The history's table and its files (None when there are none: an empty file list)."""
    return studio_lib.history_rows(history), studio_lib.history_files(history) or None


# --------------------------------------------------------------------------- serving


def use_source_checkout(root: Path | None = None) -> Path | None:
    """Make a source checkout that pip never installed work like an installed one.

    A Hugging Face Space installs requirements.txt only, so the project's own entry points
    (its audio-source plugins in ``plugins/``) are unknown to ``importlib.metadata``. Here the
    distribution record an install would write is written to a temporary folder on
    ``sys.path`` (name, version and entry points read from pyproject.toml) and ``plugins/`` is
    put on the path: plugins are then found exactly as after ``pip install``. Does nothing
    when the project is installed; returns the temporary folder (removed at exit) or None.
    """
    from importlib import metadata

    root = Path(root or Path(__file__).resolve().parent)
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip install -e . instead
        return None
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    try:
        metadata.distribution(project["name"])
        return None
    except metadata.PackageNotFoundError:
        pass
    folder = Path(tempfile.mkdtemp(prefix="musetalk-checkout-"))
    atexit.register(shutil.rmtree, folder, True)
    record = folder / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    record.mkdir()
    (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = [f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in entries.items())
              for group, entries in project.get("entry-points", {}).items()]
    (record / "entry_points.txt").write_text("\n".join(groups))
    sys.path[:0] = [str(root), str(root / "plugins"), str(folder)]
    logger.info("running from a source checkout: the project's plugins are registered from %s", record)
    return folder


def serve(demo, services: Studio, host: str | None = None, port: int | None = None,
          prevent_thread_lock: bool = False, quiet: bool = False):
    """Queue (one model job at a time, a bounded line) and launch; returns what launch returns."""
    import gradio as gr

    from musetalk import live_rtc

    demo.queue(default_concurrency_limit=1, max_size=services.config.queue_size)
    settings = dict(
        server_name=host, server_port=port, prevent_thread_lock=prevent_thread_lock, quiet=quiet,
        max_file_size=f"{services.config.max_upload_mb}mb",
        # Results are copied from the request folders into Gradio's cache; nothing else is served.
        allowed_paths=[str(services.work_dir)],
        theme=gr.themes.Soft(), css=CSS, footer_links=["api", "gradio", "settings"],
    )
    if not live_rtc.available()[0]:
        return demo.launch(**settings)
    from musetalk.live_page import launch_with_live

    # The Live tab's WebRTC routes too, with the configured STUN/TURN servers.
    return launch_with_live(demo, services.live_registry, services.config.ice_settings(), **settings)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="Serve MuseTalk Studio in the browser.")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, help="port (default 7860, or $GRADIO_SERVER_PORT)")
    parser.add_argument("--models-dir", help="weights folder (default $MUSETALK_MODELS_DIR or the user cache)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--dtype", default="auto", help="auto, fp16, bf16 or fp32")
    parser.add_argument("--version", dest="model_version", choices=("v15", "v1"), default="v15",
                        help="the model version loaded at start-up")
    parser.add_argument("--work-dir", help=f"request folders (default ${studio_lib.ENVIRONMENT['work_dir']} "
                                           "or a temporary folder)")
    parser.add_argument("--max-upload-mb", type=int, help="largest upload")
    parser.add_argument("--max-seconds", type=float, help="longest video or speech")
    parser.add_argument("--queue-size", type=int, help="requests waiting beyond the one running")
    parser.add_argument("-v", "--verbose", action="store_true")
    live_ice.add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("musetalk").setLevel(logging.INFO)
    use_source_checkout()
    try:
        config = StudioConfig.from_env(
            models_dir=args.models_dir, device=args.device, dtype=args.dtype, version=args.model_version,
            work_dir=args.work_dir, max_upload_mb=args.max_upload_mb, max_seconds=args.max_seconds,
            queue_size=args.queue_size, **live_ice.from_arguments(args),
        )
        services = Studio(config)
        atexit.register(services.close)
        services.load_models()  # the one model load of this process (or on first use, without weights)
    except MuseTalkError as error:
        sys.stderr.write(f"app.py: error: {error}\n")
        return 2
    signal.signal(signal.SIGTERM, _leave_on_sigterm)
    serve(build_demo(services), services, host=args.host, port=args.port)
    return 0


def _leave_on_sigterm(signum, frame) -> None:
    """`docker stop` sends SIGTERM: leave through SystemExit so the atexit clean-up runs. A second TERM (a
    supervisor and its child both passing it on) is ignored, or it would break off that clean-up."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
