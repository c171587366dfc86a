"""The extras made in the dub's own pass: the pipeline's frame sinks, and the scores measured from the
job's face analysis against what they replace (metrics.score_video, which still serves the command line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from musetalk import metrics, schedule, video_io
from musetalk.config import RunOptions
from musetalk.errors import InputError
from musetalk.pipeline import LipSyncPipeline

from conftest import example_face, example_speech

# How far the scores measured in the pass may be from score_video's on the same dub. The pass runs the
# face mesh in the box of the job's own landmarks, following the face from frame to frame, where
# score_video detects it again in the output: the landmarks differ by a pixel or two, which reads as a
# silent mouth 0.008 eye distances more open and a correlation up to 0.04 higher (measured on the
# example face, 3 s and 7.6 s of speech). Identity is measured on every fourth frame of the encoded output.
TOLERANCES = {
    "sync_correlation": 0.06,
    "sync_lag_ms": 10.0,  # a quarter of a frame at 25 fps
    "silence_mouth_open": 0.012,  # eye distances; a mouth counts as closed below 0.05
    "speech_mouth_open": 0.012,
    "silent_closed_share": 0.05,
    "identity_psnr": 0.5,  # dB
    "identity_ssim": 0.002,
    "box_jitter": 0.004,  # eye distances per frame squared; a still face measures 0.005 to 0.01
    "mouth_jitter": 0.004,
    "face_coverage": 0.02,
}


@pytest.fixture(scope="module")
def pipeline():
    return LipSyncPipeline.from_pretrained(engine="preview", cache_dir=False)


@pytest.fixture(scope="module")
def face_2s(tmp_path_factory) -> Path:
    """2 s (50 frames at 25 fps) of the example face at 216x252, no sound."""
    return example_face(tmp_path_factory.mktemp("sink-media") / "face.mp4", 2)


@pytest.fixture(scope="module")
def speech_3s(tmp_path_factory) -> Path:
    """The first 3 s of the example speech (75 frames: the 50 video frames played forward, then back)."""
    return example_speech(tmp_path_factory.mktemp("sink-media") / "speech.wav", 3)


class Recorder:
    """A sink that keeps what it is handed."""

    def start(self, plan) -> None:
        self.plan, self.positions, self.sources, self.frames = plan, [], [], []

    def add(self, position, source, frame) -> None:
        self.positions.append(position)
        self.sources.append((source.index, source.landmarks is not None))
        self.frames.append(frame)


@pytest.fixture(scope="module")
def dubbed(pipeline, face_2s, speech_3s, tmp_path_factory):
    """One dub with every sink, and the same dub without any."""
    folder = tmp_path_factory.mktemp("dubbed")
    recorder, scorer = Recorder(), metrics.FrameScorer()
    result = pipeline(face_2s, speech_3s, folder / "with_sinks.mp4", RunOptions(), sinks=[recorder, scorer])
    plain = pipeline(face_2s, speech_3s, folder / "plain.mp4", RunOptions())
    scores = scorer.close(result.output_path)
    return folder, result, plain, recorder, scores


def test_the_dub_is_the_same_file_with_sinks_and_they_see_every_frame_in_order(dubbed, face_2s):
    folder, result, plain, recorder, _scores = dubbed
    assert Path(result.output_path).read_bytes() == Path(plain.output_path).read_bytes()
    assert recorder.plan.num_frames == result.num_frames == 75 and recorder.plan.fps == 25.0
    assert (recorder.plan.width, recorder.plan.height) == (216, 252)
    assert recorder.positions == list(range(75))
    expected = schedule.frame_schedule(75, video_io.probe(face_2s).num_frames, "pingpong")
    assert [index for index, _ in recorder.sources] == list(expected)
    assert all(has_face for _, has_face in recorder.sources)
    # What a sink is handed is what was encoded: the decoded output differs by the encoder's loss only.
    decoded = list(video_io.read_frames(result.output_path))
    assert min(metrics.psnr(a, b) for a, b in zip(decoded, recorder.frames)) > 35


def assert_agrees_with_score_video(scores: metrics.Scores, again: metrics.Scores) -> None:
    """``scores`` (made in the pass) are within TOLERANCES of ``again`` (score_video's), None where it is None."""
    for name in metrics.Scores.names():
        ours, theirs = getattr(scores, name), getattr(again, name)
        assert (ours is None) == (theirs is None), (name, ours, theirs, scores.reasons, again.reasons)
        if ours is not None:
            assert ours == pytest.approx(theirs, abs=TOLERANCES[name]), name
    assert set(TOLERANCES) == {name for name in metrics.Scores.names() if getattr(again, name) is not None}
    # Not a vacuous agreement: the preview engine's mouth follows the speech and closes in its pauses.
    assert scores.sync_correlation > 0.5 and scores.speech_mouth_open > 2 * scores.silence_mouth_open


def test_the_scores_agree_with_score_video_within_the_tolerances(dubbed, face_2s, speech_3s):
    _folder, result, _plain, _recorder, scores = dubbed
    assert_agrees_with_score_video(scores, metrics.score_video(result.output_path, source=face_2s, audio=speech_3s))


def test_a_longer_dub_meshes_half_its_frames_and_scores_within_the_same_tolerances(pipeline, face_2s, tmp_path):
    speech = example_speech(tmp_path / "speech.wav", 7.6)  # 190 frames: over MESH_SAMPLED_FROM_S
    scorer = metrics.FrameScorer()
    result = pipeline(face_2s, speech, tmp_path / "dubbed.mp4", RunOptions(), sinks=[scorer])
    scores = scorer.close(result.output_path)
    assert result.num_frames == 190
    # The frames the mesh found the face in (the example face: every frame it ran on).
    measured = [position for position, row in enumerate(scorer._rows) if row is not None]
    assert len(measured) == 95 and all(position % 10 < metrics.MESH_RUN for position in measured)
    # SyncNet reads the face in every frame: the job's own where the mesh did not run.
    assert all(row is not None for row in scorer._located)
    assert_agrees_with_score_video(scores, metrics.score_video(result.output_path, source=face_2s, audio=speech))


def test_a_failed_job_leaves_nothing_of_its_sinks(pipeline, face_2s, speech_3s, tmp_path):
    class Failing:
        def start(self, plan) -> None:
            pass

        def add(self, position, source, frame) -> None:
            if position == 10:
                raise InputError("the sink gave up")

    scorer = metrics.FrameScorer()
    with pytest.raises(InputError, match="the sink gave up"):
        pipeline(face_2s, speech_3s, tmp_path / "dubbed.mp4", RunOptions(), sinks=[scorer, Failing()])
    scorer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_scorer_that_saw_no_job_says_so(tmp_path):
    with pytest.raises(InputError, match="the scorer saw no frames"):
        metrics.FrameScorer().close(tmp_path / "dubbed.mp4")
    metrics.FrameScorer().abort()  # nothing to undo
