"""The live page: choose a face, talk (or type), and the face answers over WebRTC; record it as an mp4.

Used twice, the same code: as the studio's "Live" tab (app.py) and alone by ``musetalk live``. It is
UI code in the package because the command line serves it too; nothing here loads at import
(Gradio and the WebRTC stack load in the functions).

The page's player is a small WebRTC client (``CLIENT_JS``): the microphone goes out, the face's
picture and voice come back (``musetalk.live_rtc`` serves the other end). Its STUN/TURN servers are
the server's own (``musetalk.live_ice``), read from ``GET /live/webrtc/config`` at each Start; with
none, as on loopback or a LAN, the two ends connect directly. Every event has an ``api_name``: ``live_prepare`` (a face,
an engine -> a token), ``live_say`` (a token and text -> spoken into the connected face),
``live_microphone``, ``live_record`` and ``live_stop_recording`` (-> the mp4).
"""

from __future__ import annotations

import functools
import logging

from musetalk.errors import InputError, MuseTalkError
from musetalk.live_ice import IceSettings
from musetalk.live_rtc import OFFER_PATH, LiveConnections, LiveRegistry

logger = logging.getLogger(__name__)

ENGINE_CHOICES = [("MuseTalk (needs a GPU to keep up)", "musetalk"), ("Preview (real time on a CPU)", "preview")]

PLAYER_HTML = """
<div class="live-player">
  <video id="live-video" autoplay playsinline style="width:100%;max-height:480px;background:#111"></video>
  <div style="display:flex;gap:8px;margin-top:6px">
    <button id="live-start" class="lg primary" type="button">Start</button>
    <button id="live-stop" class="lg secondary" type="button">Stop</button>
    <span id="live-state" style="align-self:center">Not connected.</span>
  </div>
</div>
"""

# The WebRTC client: made with the server's RTCConfiguration (its STUN/TURN servers); the offer, with
# its candidates (the server takes no trickled ones), is posted as {sdp, type, token}; the answer is
# {sdp, type}, a refusal {error}.
CLIENT_JS = """
const video = element.querySelector('#live-video');
const state = element.querySelector('#live-state');
let connection = null;
let microphone = null;
function token() {
  const box = document.querySelector('#live-token textarea, #live-token input');
  return box ? box.value.trim() : '';
}
function gathered(pc) {
  return new Promise(resolve => {
    if (pc.iceGatheringState === 'complete') { resolve(); return; }
    pc.addEventListener('icegatheringstatechange', () => { if (pc.iceGatheringState === 'complete') resolve(); });
    setTimeout(resolve, 3000);
  });
}
function base() {
  return window.location.pathname.replace(/\\/$/, '') + '""" + OFFER_PATH + """/webrtc';
}
async function configuration() {
  // The server's STUN/TURN servers and policy, its TURN login too: the browser logs in to TURN itself.
  const response = await fetch(base() + '/config', {cache: 'no-store'});
  if (!response.ok) throw new Error('the WebRTC settings could not be read (HTTP ' + response.status + ')');
  return response.json();
}
async function start() {
  const id = token();
  if (!id) { state.textContent = 'Prepare a face first.'; return; }
  stop();
  state.textContent = 'Connecting...';
  const pc = new RTCPeerConnection(await configuration());
  connection = pc;
  // The voice as it is: echo cancelling, noise suppression and gain control reshape its loudness.
  microphone = await navigator.mediaDevices.getUserMedia({
    audio: {echoCancellation: false, noiseSuppression: false, autoGainControl: false}});
  microphone.getTracks().forEach(track => pc.addTrack(track, microphone));  // the face's voice comes back on it
  pc.addTransceiver('video', {direction: 'recvonly'});
  const remote = new MediaStream();
  pc.ontrack = event => { remote.addTrack(event.track); video.srcObject = remote; video.play().catch(() => {}); };
  pc.onconnectionstatechange = () => { state.textContent = 'Connection: ' + pc.connectionState; };
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  const response = await fetch(base() + '/offer', {
    method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type, token: id}),
  });
  const answer = await response.json();
  if (!response.ok) { stop(); state.textContent = 'Refused: ' + answer.error; return; }
  await pc.setRemoteDescription(answer);
}
function stop() {
  if (connection) { connection.close(); connection = null; }
  if (microphone) { microphone.getTracks().forEach(track => track.stop()); microphone = null; }
  state.textContent = 'Not connected.';
}
window.addEventListener('pagehide', stop);  // the server hears the close at once, not after ICE times out
element.querySelector('#live-start').addEventListener('click', () => start().catch(error => {
  state.textContent = 'Could not start: ' + error;
}));
element.querySelector('#live-stop').addEventListener('click', stop);
"""


# --------------------------------------------------------------------------- what the events do


def prepare_face(services, registry: LiveRegistry, video, engine: str) -> tuple[str, str]:
    """(token, status): the face prepared for a live session with ``engine``."""
    if not video:
        raise InputError("choose a face first: a video or a photo")
    services.check_video(video)
    pipeline = services.pipeline(services.config.version, engine=engine)
    token = registry.prepare(pipeline, video)
    return token, f"The face is ready ({engine} engine). Press Start, allow the microphone, and talk."


def say_text(registry: LiveRegistry, token: str, text: str, source: str | None, voice: str | None) -> str:
    """Speak ``text`` into the connected face, sentence by sentence as each is synthesized."""
    from musetalk.speech import speak_sentences

    registry.session(token)  # not connected: said before anything is synthesized
    seconds = registry.say(token, speak_sentences(text, source or "espeak", voice or None))
    return f"Said {seconds:.1f} s of speech."


def set_microphone(registry: LiveRegistry, token: str, on: bool) -> str:
    registry.use_microphone(token, on)
    return "The microphone speaks through the face." if on else "Only typed text speaks through the face."


def start_recording(registry: LiveRegistry, token: str) -> str:
    registry.start_recording(token)
    return "Recording..."


def stop_recording(registry: LiveRegistry, token: str) -> tuple[str, str]:
    path = registry.stop_recording(token)
    return path, "Saved the recording."


# --------------------------------------------------------------------------- the widgets


def build_live_tab(services, registry: LiveRegistry, default_video: str | None = None, user_errors=None,
                   demo=None, engine: str | None = None) -> None:
    """The live widgets and events, inside the current Blocks ``demo`` (a tab of the studio, or a page
    alone). ``user_errors``: how the app turns errors into messages (default: MuseTalkError as
    gr.Error). ``default_video`` is prepared as the page opens."""
    import gradio as gr

    wrap = user_errors or _errors_for_people
    sources, voices, default_source, default_voice = _speech_menus()
    default_engine = engine or ("musetalk" if services.default_engine() == "musetalk" else "preview")
    with gr.Row():
        with gr.Column(scale=2):
            face = gr.File(value=default_video, label="Face video or photo", file_types=["video", "image"],
                           type="filepath", elem_id="live-face")
            engine = gr.Radio(ENGINE_CHOICES, value=default_engine, label="Engine", elem_id="live-engine")
            prepare = gr.Button("Prepare the face", variant="primary", elem_id="live-prepare")
            token = gr.Textbox("", label="Live session", visible="hidden", elem_id="live-token")
            status = gr.Markdown("Choose a face and prepare it.", label="Live status", show_label=False,
                                 elem_id="live-status")
            microphone = gr.Checkbox(True, label="Speak through the microphone", elem_id="live-microphone")
            text = gr.Textbox("", label="Or type what the face says", lines=2, elem_id="live-text")
            with gr.Row():
                source = gr.Dropdown(sources, value=default_source, label="Speech source", allow_custom_value=True)
                voice = gr.Dropdown(voices, value=default_voice, label="Voice", allow_custom_value=True)
            say = gr.Button("Say it", elem_id="live-say")
        with gr.Column(scale=3):
            gr.HTML(PLAYER_HTML, js_on_load=CLIENT_JS, elem_id="live-player")
            with gr.Row():
                record = gr.Button("Record", elem_id="live-record")
                stop = gr.Button("Stop and save", elem_id="live-stop-recording")
            recording = gr.File(label="Recording", elem_id="live-recording")

    light = {"queue": False}
    prepare.click(wrap(functools.partial(prepare_face, services, registry)), inputs=[face, engine],
                  outputs=[token, status], api_name="live_prepare")
    if default_video and demo is not None:  # the command line's face is prepared as the page opens
        demo.load(wrap(functools.partial(prepare_face, services, registry)), inputs=[face, engine],
                  outputs=[token, status], api_name=False)
    say.click(wrap(functools.partial(say_text, registry)), inputs=[token, text, source, voice], outputs=status,
              api_name="live_say")
    microphone.change(wrap(functools.partial(set_microphone, registry)), inputs=[token, microphone],
                      outputs=status, api_name="live_microphone", **light)
    record.click(wrap(functools.partial(start_recording, registry)), inputs=token, outputs=status,
                 api_name="live_record", **light)
    stop.click(wrap(functools.partial(stop_recording, registry)), inputs=token, outputs=[recording, status],
               api_name="live_stop_recording")


def build_live_page(services, registry: LiveRegistry, default_video: str | None = None, engine: str | None = None):
    """The live page alone (``musetalk live``)."""
    import gradio as gr

    with gr.Blocks(title="MuseTalk Live") as demo:
        gr.Markdown("# MuseTalk Live\nPrepare the face, press Start, and talk: the face answers.")
        build_live_tab(services, registry, default_video, demo=demo, engine=engine)
    return demo


def launch_with_live(demo, registry: LiveRegistry, ice: IceSettings | None = None, **launch_args):
    """``demo.launch`` with the WebRTC routes on the same server, whose connections close when it stops,
    both ends using ``ice``'s STUN/TURN servers; blocks unless ``prevent_thread_lock``."""
    block = not launch_args.pop("prevent_thread_lock", False)
    connections = LiveConnections(registry, ice)
    app_kwargs = {**launch_args.pop("app_kwargs", {}), "lifespan": connections.lifespan}
    result = demo.launch(prevent_thread_lock=True, app_kwargs=app_kwargs, **launch_args)
    connections.mount(demo.app)
    if block:
        demo.block_thread()
    return result


def _speech_menus():
    """(sources, voices of the default source, default source, default voice) for the text box."""
    from musetalk import plugins

    usable = {}
    for source_id, source in plugins.audio_sources().items():
        ok, _ = source.available()
        if ok is not False:
            usable[source_id] = source
    default_source = "espeak" if "espeak" in usable else next(iter(usable), None)
    voices, default_voice = [], None
    if default_source is not None:
        listed = usable[default_source].voices()
        voices = [voice.id for voice in listed]
        default_voice = usable[default_source].default_voice or (voices[0] if voices else None)
    return [(s.label, s.id) for s in usable.values()], voices, default_source, default_voice


def _errors_for_people(function):
    import gradio as gr

    @functools.wraps(function)
    def wrapped(*args):
        try:
            return function(*args)
        except MuseTalkError as error:
            raise gr.Error(str(error)) from error

    return wrapped
