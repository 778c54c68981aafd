"""A real Pipecat 1.x telephony bot with no AI services, for the tests and the bench.

Written as a Pipecat user writes a telephony bot: a FastAPI WebSocket route,
``parse_telephony_websocket``, the serializer of ``--dialect`` (Twilio by default; Telnyx,
Plivo or Exotel, each as Pipecat's examples build it, ``auto_hang_up=False``),
``FastAPIWebsocketTransport``, a ``PipelineWorker`` run by a ``WorkerRunner``.  With
``--base-url`` the Twilio serializer keeps Pipecat's default ``auto_hang_up=True`` and hangs up
through the daemon's Twilio-compatible Calls resource (``--account-sid``, ``--auth-token``: the
daemon's API key).  The pipeline runs at ``--rate`` (8 kHz by default); the Exotel serializer
carries PCM16 at that rate too, so ``--dialect exotel --rate 16000`` is a wideband bot.
One processor stands in for the STT/LLM/TTS chain:

* ``--mode echo``: the caller's audio goes back to the caller;
* ``--mode tone``: when the stream starts the bot plays ``--tone-ms`` of a 440 Hz tone;
* ``--mode hangup-after``: echo, and after ``--after-frames`` caller frames the bot plays
  ``--goodbye-ms`` of tone and ends its pipeline (``EndWorkerFrame``) while the caller still
  talks.

In every mode a key press is reported; ``1`` interrupts the bot (``broadcast_interruption``:
Pipecat's barge-in, which the serializer sends as ``clear``) and ``#`` ends the pipeline.

Run as ``python tests/pipecat_bot.py --port 0 --mode echo``.  Everything the tests need is
printed to stdout as one JSON object per line, first ``{"event": "listening", "port": N}`` once
the server accepts connections; Pipecat's own log goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import struct
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI, WebSocket
from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import (
    EndWorkerFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    OutputAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.base_serializer import FrameSerializer
from pipecat.serializers.exotel import ExotelFrameSerializer
from pipecat.serializers.plivo import PlivoFrameSerializer
from pipecat.serializers.telnyx import TelnyxFrameSerializer
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner

RATE = 8000  # Twilio Media Streams audio: μ-law 8 kHz; the pipeline's default rate
MODES = ("echo", "tone", "hangup-after")
DIALECTS = ("twilio", "telnyx", "plivo", "exotel")


def report(event: str, **fields: Any) -> None:
    """One line of JSON on stdout: what the tests read."""
    print(json.dumps({"event": event, **fields}), flush=True)


def tone_pcm(ms: int, rate: int = RATE, hz: float = 440.0, amplitude: int = 8000) -> bytes:
    """``ms`` milliseconds of a sine, PCM16 LE at ``rate`` (the tests' ``support.tone`` shape)."""
    n = rate * ms // 1000
    return struct.pack(
        f"<{n}h", *(int(amplitude * math.sin(2 * math.pi * hz * i / rate)) for i in range(n))
    )


def tone_frames(ms: int, rate: int = RATE) -> list[OutputAudioRawFrame]:
    pcm = tone_pcm(ms, rate)
    step = rate // 50 * 2  # 20 ms
    return [
        OutputAudioRawFrame(audio=pcm[i : i + step], sample_rate=rate, num_channels=1)
        for i in range(0, len(pcm), step)
    ]


def serializer_for(
    dialect: str, call_data: Any, rate: int, options: argparse.Namespace
) -> FrameSerializer:
    """The serializer of ``dialect``, built from what ``parse_telephony_websocket`` found."""
    stream_id = call_data.stream_id or ""
    call_id = call_data.call_id or ""
    if dialect == "twilio" and options.base_url:
        return TwilioFrameSerializer(  # Pipecat's defaults: auto_hang_up=True
            stream_sid=stream_id,
            call_sid=call_id,
            account_sid=options.account_sid,
            auth_token=options.auth_token,
            base_url=options.base_url,
        )
    if dialect == "telnyx":
        encoding = call_data.outbound_encoding or "PCMU"
        return TelnyxFrameSerializer(
            stream_id=stream_id,
            outbound_encoding=encoding,
            inbound_encoding=encoding,
            call_control_id=call_id,
            params=TelnyxFrameSerializer.InputParams(auto_hang_up=False),
        )
    if dialect == "plivo":
        return PlivoFrameSerializer(
            stream_id=stream_id,
            call_id=call_id,
            params=PlivoFrameSerializer.InputParams(auto_hang_up=False),
        )
    if dialect == "exotel":
        return ExotelFrameSerializer(
            stream_sid=stream_id,
            call_sid=call_id,
            params=ExotelFrameSerializer.InputParams(exotel_sample_rate=rate),
        )
    return TwilioFrameSerializer(
        stream_sid=stream_id,
        call_sid=call_id,
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
    )


class ScriptedBrain(FrameProcessor):
    """What the STT, LLM and TTS would do, reduced to echo, keys and hanging up."""

    def __init__(self, call_id: str, options: argparse.Namespace) -> None:
        super().__init__()
        self.call_id = call_id
        self.options = options
        self.frames_in = 0
        self.ending = False

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self._caller_audio(frame)
        elif isinstance(frame, InputDTMFFrame):
            await self._key(frame.button)
        else:
            await self.push_frame(frame, direction)

    async def _caller_audio(self, frame: InputAudioRawFrame) -> None:
        self.frames_in += 1
        if self.ending:
            return
        if self.options.mode in ("echo", "hangup-after"):
            await self.push_frame(
                OutputAudioRawFrame(
                    audio=frame.audio, sample_rate=frame.sample_rate, num_channels=1
                )
            )
        if self.options.mode == "hangup-after" and self.frames_in >= self.options.after_frames:
            await self._end(f"after {self.frames_in} caller frames")

    async def _key(self, key: KeypadEntry) -> None:
        report("dtmf", call=self.call_id, digit=key.value)
        if key is KeypadEntry.ONE:
            report("interrupt", call=self.call_id)
            await self.broadcast_interruption()
        elif key is KeypadEntry.POUND and not self.ending:
            await self._end("caller pressed #")

    async def _end(self, why: str) -> None:
        """Say goodbye, then end the pipeline after it: Pipecat's graceful hang-up."""
        self.ending = True
        report("hangup", call=self.call_id, why=why)
        for goodbye in tone_frames(self.options.goodbye_ms, self.options.rate):
            await self.push_frame(goodbye)
        await self.push_frame(EndWorkerFrame(reason=why))


async def run_call(websocket: WebSocket, options: argparse.Namespace) -> None:
    """One call, as Pipecat's telephony examples run it."""
    transport_type, call_data = await parse_telephony_websocket(websocket)
    call_id = call_data.call_id or ""
    report(
        "connected",
        call=call_id,
        transport_type=transport_type,
        stream_id=call_data.stream_id,
        from_number=call_data.from_number,
        body=call_data.body,
    )
    serializer = serializer_for(options.dialect, call_data, options.rate, options)
    transport_options: dict[str, Any] = {}
    if options.end_silence is not None:
        transport_options["audio_out_end_silence_secs"] = options.end_silence
    if options.chunk_ms is not None:
        transport_options["audio_out_10ms_chunks"] = options.chunk_ms // 10
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=serializer,
            **transport_options,
        ),
    )
    brain = ScriptedBrain(call_id, options)
    pipeline = Pipeline([transport.input(), brain, transport.output()])
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=options.rate, audio_out_sample_rate=options.rate
        ),
    )

    @transport.event_handler("on_client_connected")
    async def on_client_connected(_transport: Any, _websocket: Any) -> None:
        report("ready", call=call_id)
        if options.mode == "tone":
            await worker.queue_frames(tone_frames(options.tone_ms, options.rate))

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(_transport: Any, _websocket: Any) -> None:
        report("disconnected", call=call_id)
        await worker.cancel()

    @worker.event_handler("on_pipeline_finished")
    async def on_pipeline_finished(_worker: Any, frame: Frame) -> None:
        report("finished", call=call_id, frame=type(frame).__name__)

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()
    report("ended", call=call_id, frames_in=brain.frames_in)


def make_app(options: argparse.Namespace) -> FastAPI:
    app = FastAPI()

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        await run_call(websocket, options)

    return app


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    parser.add_argument("--mode", choices=MODES, default="echo")
    parser.add_argument("--dialect", choices=DIALECTS, default="twilio", help="its serializer")
    parser.add_argument("--rate", type=int, default=RATE, help="the pipeline's sample rate")
    parser.add_argument("--tone-ms", type=int, default=1000, help="tone mode: its length")
    parser.add_argument(
        "--after-frames", type=int, default=25, help="hangup-after: caller frames first"
    )
    parser.add_argument("--goodbye-ms", type=int, default=200, help="tone played before ending")
    parser.add_argument(
        "--end-silence",
        type=int,
        help="audio_out_end_silence_secs (Pipecat's default, 2, when not given)",
    )
    parser.add_argument(
        "--chunk-ms", type=int, help="audio sent per message, ms (10 times audio_out_10ms_chunks)"
    )
    parser.add_argument(
        "--base-url", help="hang up through this Twilio-compatible REST API (auto_hang_up)"
    )
    parser.add_argument("--account-sid", default="rapida-asterisk", help="with --base-url")
    parser.add_argument("--auth-token", help="with --base-url: the daemon's API key")
    parser.add_argument("--log-level", default="WARNING", help="Pipecat's log (stderr)")
    return parser.parse_args(argv)


async def serve(options: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", options.port))
    config = uvicorn.Config(
        make_app(options), log_level="warning", lifespan="off", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()  # start-up failed: raise its error
            return
        await asyncio.sleep(0.01)
    report("listening", port=sock.getsockname()[1])
    await serving


def main(argv: list[str] | None = None) -> None:
    options = parse(sys.argv[1:] if argv is None else argv)
    logger.remove()
    logger.add(sys.stderr, level=options.log_level)
    asyncio.run(serve(options))


if __name__ == "__main__":
    main()
