"""`musetalk bench --live`: a live session fed like a microphone, measured from its frames.

Speech with pauses is pushed in 20 ms pieces at the pace it would be spoken; the frames are
taken as a player takes them (when due). Then, from the frames:

- sustained frames per second (frames over the time between the first and the last) and the
  frames the session skipped because generation fell behind;
- mouth-to-speech latency: for each spoken stretch, from the moment its first loud 10 ms was
  pushed to the moment the first frame with the mouth open was shown, with the scores' mouth
  measure (inner-lip gap over eye distance, ``metrics.mouth_track``) deciding "open".
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from musetalk import audio as audio_lib
from musetalk import face, metrics
from musetalk.live import LiveSession

SR = audio_lib.SAMPLE_RATE
PIECE_S = 0.02  # a microphone's packet
SPEECH_S, PAUSE_S = 2.0, 1.0  # each spoken stretch and the pause after it
ONSET_DB = -30.0  # a 10 ms step this close to the loudest is speech that opens a mouth
OPEN_SHARE = 0.5  # "open": the opening passed half the way from the rest to the speech's typical opening


@dataclass
class LiveBenchReport:
    engine: str
    device: str
    seconds: float
    frame_size: tuple[int, int]
    fps_video: float
    stated_latency_ms: float
    frames: int
    sustained_fps: float
    frames_skipped: int
    frames_stood_in: int  # drawn by the preview engine because the session's engine was late
    latency_ms: list[float]  # one per spoken stretch: its first loud sound pushed -> the mouth shown open
    latency_ms_mean: float | None
    # Of that, what the frames themselves hold (as in a dub): the first loud sound's time in the stream to
    # the middle of the first open frame. The mouth takes a while to open; the rest is the pipeline's delay.
    shape_delay_ms_mean: float | None
    batch_size: int
    # Silence the session's clock put between pieces that came late (the microphone's thread woke late):
    # the stream cannot take it back, so every later frame is that much later.
    late_audio_ms: float = 0.0

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def speech_with_pauses(speech: np.ndarray, seconds: float) -> tuple[np.ndarray, list[int]]:
    """Pauses and stretches of ``speech`` for ``seconds``; returns the waveform and each stretch's onset sample
    (its first loud 10 ms step)."""
    parts, onsets, position, cursor = [], [], 0, 0
    while position < seconds * SR:
        pause = np.zeros(int(PAUSE_S * SR), np.float32)
        stretch = speech[cursor: cursor + int(SPEECH_S * SR)]
        if stretch.size < SPEECH_S * SR:
            cursor, stretch = 0, speech[: int(SPEECH_S * SR)]
        cursor += stretch.size
        position += pause.size
        onset = _first_loud_step(stretch)
        if onset is not None:
            onsets.append(position + onset)
        parts += [pause, stretch]
        position += stretch.size
    return np.concatenate(parts), onsets


def _first_loud_step(wav: np.ndarray) -> int | None:
    envelope = metrics.loudness_envelope(wav, rate=100.0)
    loud = np.flatnonzero(envelope > envelope.max() + ONSET_DB)
    return int(loud[0] * SR / 100) if loud.size else None


def run_live_bench(pipeline, video: str | Path, speech: np.ndarray, seconds: float = 20.0) -> LiveBenchReport:
    wav, onsets = speech_with_pauses(speech, seconds)
    session = LiveSession(pipeline, video).start()
    pushed_at: dict[int, tuple[float, int]] = {}  # piece's first sample -> (when pushed, where in the stream)

    def microphone():
        piece = int(PIECE_S * SR)
        started = time.monotonic()
        for number, first in enumerate(range(0, wav.size, piece)):
            time.sleep(max(0.0, started + number * PIECE_S - time.monotonic()))
            moment = time.monotonic()
            pushed_at[first] = (moment, session.push_audio(wav[first: first + piece]))
        session.close()

    feeder = threading.Thread(target=microphone, name="bench-microphone")
    feeder.start()
    shown, images = [], []
    for frame in session.frames():
        shown.append(time.monotonic())
        images.append(frame.image)
    feeder.join()
    session.stop()
    return _report(pipeline, session, wav, onsets, pushed_at, shown, images, seconds)


def _report(pipeline, session, wav, onsets, pushed_at, shown, images, seconds) -> LiveBenchReport:
    with face.FaceAnalyzer() as analyzer:
        track = analyzer.analyze(images)
    opening = metrics.mouth_track(track, session.fps).opening
    piece = int(PIECE_S * SR)
    latencies, shape_delays = [], []
    rest = float(np.nanpercentile(opening, 10))
    speaking = float(np.nanpercentile(opening, 75))
    threshold = rest + OPEN_SHARE * (speaking - rest)
    for onset in onsets:
        first = onset // piece * piece
        if first not in pushed_at:
            continue
        pushed, position = pushed_at[first]
        after = [k for k, moment in enumerate(shown) if moment >= pushed and opening[k] > threshold]
        if after:
            latencies.append(round((shown[after[0]] - pushed) * 1000, 1))
        # On the stream's timeline, where the piece landed (after any silence the clock put before it).
        in_stream_s = (position + onset - first) / SR
        in_stream = [k for k in range(len(shown)) if (k + 1) / session.fps > in_stream_s and opening[k] > threshold]
        if in_stream:
            shape_delays.append(((in_stream[0] + 0.5) / session.fps - in_stream_s) * 1000)
    span = shown[-1] - shown[0] if len(shown) > 1 else float("nan")
    device = getattr(getattr(pipeline.engine, "device", None), "type", "cpu")
    return LiveBenchReport(
        engine=pipeline.engine.name, device=str(device), seconds=round(wav.size / SR, 2),
        frame_size=tuple(images[0].shape[:2]), fps_video=session.fps,
        stated_latency_ms=round(session.latency_s * 1000, 1), frames=len(shown),
        sustained_fps=round((len(shown) - 1) / span, 2), frames_skipped=session.stats.frames_skipped,
        frames_stood_in=session.stats.frames_stood_in,
        latency_ms=latencies, latency_ms_mean=round(float(np.mean(latencies)), 1) if latencies else None,
        shape_delay_ms_mean=round(float(np.mean(shape_delays)), 1) if shape_delays else None,
        batch_size=session.batch_size, late_audio_ms=round(_late_audio_s(pushed_at) * 1000, 1),
    )


def _late_audio_s(pushed_at: dict[int, tuple[float, int]]) -> float:
    """The silence the clock put between the pieces (the first piece's own offset from the clock's start is
    no delay: the stream begins with it)."""
    if not pushed_at:
        return 0.0
    first, last = min(pushed_at), max(pushed_at)
    return ((pushed_at[last][1] - last) - (pushed_at[first][1] - first)) / SR


def format_report(report: LiveBenchReport) -> list[str]:
    height, width = report.frame_size
    lines = [
        f"live bench: {report.engine} engine on {report.device}, {width}x{height} at {report.fps_video:g} fps, "
        f"{report.seconds:g} s of speech with pauses, batches of {report.batch_size}",
        f"  sustained: {report.sustained_fps:.2f} frames/s over {report.frames} frames, "
        f"{report.frames_skipped} skipped, {report.frames_stood_in} drawn by the preview engine instead",
        f"  audio that came late: {report.late_audio_ms:.0f} ms of silence put between the microphone's pieces",
        f"  stated latency: {report.stated_latency_ms:.0f} ms",
    ]
    if report.latency_ms:
        lines.append(f"  mouth-to-speech latency: {report.latency_ms_mean:.0f} ms on average "
                     f"({', '.join(f'{v:.0f}' for v in report.latency_ms)} ms per stretch)")
        if report.shape_delay_ms_mean is not None:
            lines.append(f"    of which the mouth's own opening (in the frames, as in a dub): "
                         f"{report.shape_delay_ms_mean:.0f} ms; the stream's delay: "
                         f"{report.latency_ms_mean - report.shape_delay_ms_mean:.0f} ms")
    else:
        lines.append("  mouth-to-speech latency: no stretch opened the mouth (nothing measured)")
    return lines
