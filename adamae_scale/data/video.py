"""Video bytes and files → frames with PyAV; temporal window sampling; H.264 / JPEG encoding.

Decoded frames come out as a player shows them (``Geometry``): non-square pixels stretched to the display
aspect, and the display matrix (rotation, mirroring) applied the way ffmpeg's autorotate does.

No torch and no torch.distributed here: the shard writer, the loader workers and the benchmark all
call these functions. Frames are ``uint8`` arrays ``[T, H, W, 3]`` (RGB).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ogv", ".3gp", ".wmv")


class VideoError(Exception):
    """A video that cannot be used; ``str(err)`` is the reason shown to the user."""


def _open(source: str | Path | bytes) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise VideoError("empty file (0 bytes)")
        return av.open(io.BytesIO(source), mode="r")
    path = Path(source)
    if not path.is_file():
        raise VideoError("file not found")
    if path.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    return av.open(str(path), mode="r")


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    num_frames: int  # as declared by the container (0 when it does not say)
    duration: float  # seconds (0.0 when unknown)


@dataclass(frozen=True)
class Geometry:
    """How a player shows a decoded picture, as ffmpeg's autorotate does: the width stretched by the sample
    aspect ratio (non-square pixels), then the display matrix applied (a turn by a multiple of 90 degrees,
    possibly mirrored)."""

    sar: Fraction = Fraction(1)
    rotation: int = 0  # clockwise degrees, as in the ``rotate`` tag: a display matrix of -90 degrees is 90
    mirrored: bool = False
    # The display matrix as array operations, in this order:
    transpose: bool = False
    flip_x: bool = False
    flip_y: bool = False

    @classmethod
    def of(cls, stream: av.video.stream.VideoStream, frame: av.VideoFrame) -> Geometry:
        """The stream's SAR (the container's first, then the codec's, as ffmpeg picks it) and the display
        matrix that the decoder attached to ``frame``."""
        sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
        sar = Fraction(sar) if sar is not None and sar > 0 else Fraction(1)
        matrix = display_matrix(frame)
        return cls(sar) if matrix is None else cls.from_matrix(matrix, sar)

    @classmethod
    def from_matrix(cls, matrix: Sequence[int], sar: Fraction = Fraction(1)) -> Geometry:
        """From FFmpeg's display matrix, which maps a source pixel (x, y) to (a·x + c·y, b·x + d·y) on
        screen (y down), with a, b, c, d = m[0], m[1], m[3], m[4]. ``rotate=90`` footage (a display matrix
        of -90 degrees) has a = d = 0, b = 1, c = -1: a clockwise quarter turn."""
        a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]
        scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
        if scale_x == 0 or scale_y == 0:
            raise VideoError("degenerate display matrix")
        angle = math.degrees(math.atan2(b / scale_y, a / scale_x))
        quarter = round(angle / 90)
        if abs(angle - 90 * quarter) > 1:
            raise VideoError(f"display matrix turns the picture by {angle:.1f} degrees: only multiples of 90 work")
        rotation, mirrored = quarter * 90 % 360, a * d - b * c < 0
        if abs(b) > abs(a):  # the picture's rows become its columns
            return cls(sar, rotation, mirrored, transpose=True, flip_x=c < 0, flip_y=b < 0)
        return cls(sar, rotation, mirrored, transpose=False, flip_x=a < 0, flip_y=d < 0)

    @property
    def turns(self) -> bool:
        """Whether the display matrix moves pixels (is not the identity)."""
        return self.transpose or self.flip_x or self.flip_y

    def display_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the upright, square-pixel picture shown for a decoded ``width × height`` one."""
        width = max(1, round(width * self.sar))
        return (height, width) if self.transpose else (width, height)

    def upright(self, image: np.ndarray) -> np.ndarray:
        """An ``[H, W, C]`` picture already at the display aspect, turned and mirrored as displayed."""
        if self.transpose:
            image = image.transpose(1, 0, 2)
        if self.flip_x:
            image = image[:, ::-1]
        if self.flip_y:
            image = image[::-1]
        return np.ascontiguousarray(image)

    def describe(self) -> dict[str, object]:
        """The JSON fields of a shard sample that record the source geometry."""
        return {
            "source_sar": f"{self.sar.numerator}:{self.sar.denominator}",
            "source_rotation": self.rotation,
            "source_mirrored": self.mirrored,
        }


def display_matrix(frame: av.VideoFrame) -> tuple[int, ...] | None:
    """FFmpeg's 3×3 display matrix (row-major int32, 16.16 fixed point) of a decoded frame, if it has one.

    Decoders copy the stream's matrix (the mp4 ``tkhd`` one, which phones set for portrait video) to every
    frame; PyAV has no stream-level accessor for it.
    """
    try:
        data = frame.side_data["DISPLAYMATRIX"]  # type: ignore[typeddict-item]  # av's stub lists motion vectors only
    except KeyError:
        return None
    return tuple(int(v) for v in np.frombuffer(bytes(data), dtype=np.int32))


class VideoReader:
    """One opened video stream. Use as a context manager; decoding runs single-threaded, because
    parallelism comes from worker processes."""

    def __init__(self, source: str | Path | bytes):
        try:
            self.container = _open(source)
        except VideoError:
            raise
        except (av.FFmpegError, OSError, ValueError) as err:
            raise VideoError(f"not a readable video ({_short(err)})") from err
        if not self.container.streams.video:
            kinds = "audio only" if self.container.streams.audio else "no streams"
            self.container.close()
            raise VideoError(f"no video stream ({kinds})")
        self.stream = self.container.streams.video[0]
        self.stream.codec_context.thread_count = 1
        rate = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
        if not rate or rate <= 0:
            self.container.close()
            raise VideoError("no frame rate in the container")
        self.rate = Fraction(rate)
        duration = 0.0
        if self.stream.duration is not None and self.stream.time_base is not None:
            duration = float(self.stream.duration * self.stream.time_base)
        elif self.container.duration is not None:
            duration = self.container.duration / av.time_base
        self.info = VideoInfo(
            self.stream.codec_context.width,
            self.stream.codec_context.height,
            float(self.rate),
            int(self.stream.frames or 0),
            duration,
        )
        start = self.stream.start_time
        time_base = self.stream.time_base
        self._start = float(start * time_base) if start is not None and time_base is not None else 0.0
        # One scaler for the whole stream: a new one per frame re-plans the conversion every time, which
        # cost more than decoding the frame.
        self._reformatter = VideoReformatter()
        self._turned_reformatter = VideoReformatter()  # upright RGB → ``format``: a second, also kept
        self._geometry: Geometry | None = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()

    def geometry(self, frame: av.VideoFrame) -> Geometry:
        """The stream's display geometry, read from its first decoded frame (the display matrix travels
        with the frames) and kept for the whole stream."""
        if self._geometry is None:
            self._geometry = Geometry.of(self.stream, frame)
        return self._geometry

    def display_frame(
        self,
        frame: av.VideoFrame,
        size: tuple[int, int] | None = None,
        format: str = "rgb24",
        interpolation: str = "BILINEAR",
    ) -> av.VideoFrame:
        """``frame`` as a player shows it (square pixels, upright) in pixel ``format``, scaled to
        ``size`` = (height, width), by default the display size."""
        geometry = self.geometry(frame)
        if size is None:
            width, height = geometry.display_size(frame.width, frame.height)
        else:
            height, width = size
        if not geometry.turns:
            return self._reformatter.reformat(
                frame, width=width, height=height, format=format, interpolation=interpolation
            )
        if geometry.transpose:  # scale before turning: fewer pixels to move
            width, height = height, width
        rgb = self._reformatter.reformat(
            frame, width=width, height=height, format="rgb24", interpolation=interpolation
        ).to_ndarray()
        upright = av.VideoFrame.from_ndarray(geometry.upright(rgb), format="rgb24")
        return self._turned_reformatter.reformat(upright, format=format, interpolation=interpolation)

    def to_rgb(
        self, frame: av.VideoFrame, size: tuple[int, int] | None = None, interpolation: str = "BILINEAR"
    ) -> np.ndarray:
        """``display_frame`` as an ``[H, W, 3]`` uint8 array."""
        return self.display_frame(frame, size, "rgb24", interpolation).to_ndarray()

    def frame_time(self, frame: av.VideoFrame) -> float:
        """Seconds since the stream start."""
        return (float(frame.time) if frame.time is not None else 0.0) - self._start

    def frames(self, skip: Callable[[av.Packet], bool] | None = None) -> Iterator[av.VideoFrame]:
        """Every frame from the current position (the start unless seeked), leaving out packets that
        ``skip`` rejects; decoding errors become ``VideoError`` naming the frame."""
        count = 0
        try:
            for packet in self.container.demux(self.stream):
                if skip is not None and packet.size and skip(packet):
                    continue
                for frame in packet.decode():
                    yield frame
                    count += 1
        except av.FFmpegError as err:
            raise VideoError(f"truncated or corrupt: decoding failed after {count} frames ({_short(err)})") from err

    def _index_of(self, pts: int | None) -> int | None:
        if pts is None or self.stream.time_base is None:
            return None
        return int(round((float(pts * self.stream.time_base) - self._start) * float(self.rate)))

    def _disposable_filter(self, pending: set[int]) -> Callable[[av.Packet], bool] | None:
        """For H.264 in mp4 (4-byte NAL lengths): reject packets of non-reference pictures (nal_ref_idc 0,
        e.g. the B-frames of a stream without B-pyramid) that are not wanted. Nothing refers to them, so
        the wanted frames decode identically; a window of every 4th frame then decodes about half the frames."""
        ctx = self.stream.codec_context
        extradata = ctx.extradata or b""
        if ctx.name != "h264" or len(extradata) < 5 or extradata[0] != 1 or extradata[4] & 3 != 3:
            return None

        def skip(packet: av.Packet) -> bool:
            index = self._index_of(packet.pts)
            if index is None or index in pending:
                return False
            data, offset = bytes(packet), 0
            while offset + 5 <= len(data):
                length = int.from_bytes(data[offset : offset + 4], "big")
                header = data[offset + 4]
                if header & 0x1F in (1, 5):  # the first coded slice decides
                    return header & 0x60 == 0
                offset += 4 + length
            return False

        return skip

    def read_indices(
        self, indices: Sequence[int], size: tuple[int, int] | None = None, skip_disposable: bool = False
    ) -> np.ndarray:
        """Frames at ``indices`` (any order, repeats allowed) as ``[len(indices), H, W, 3]`` uint8.

        Seeks to the key frame before the first wanted frame and decodes forward to the last one; a
        frame's index is its timestamp × frame rate (constant-rate streams, which the shard writer
        produces). Indices past the end repeat the last decoded frame. Frames come as displayed
        (``to_rgb``: square pixels, upright); ``size`` = (height, width) resizes while converting.
        ``skip_disposable`` leaves unwanted non-reference H.264 pictures undecoded (shards written by
        adamae-shards have only such B-frames).
        """
        wanted = sorted(set(int(i) for i in indices))
        first, last = wanted[0], wanted[-1]
        got: dict[int, np.ndarray] = {}
        fps = float(self.rate)
        if first > 0 and self.stream.time_base is not None:
            target = int((first / fps + self._start) / self.stream.time_base)
            try:
                self.container.seek(target, stream=self.stream, backward=True, any_frame=False)
            except av.FFmpegError:
                self.container.seek(0)
        latest: tuple[int, av.VideoFrame] | None = None
        decoded_any = False
        pending = set(wanted)
        for frame in self.frames(self._disposable_filter(pending) if skip_disposable else None):
            decoded_any = True
            index = int(round(self.frame_time(frame) * fps))
            if not got and index > first and first > 0:
                # The seek overshot (no key frame index in the file): decode from the start instead.
                self.container.seek(0)
                return self._read_from_start(wanted, indices, size)
            latest = (index, frame)
            if index in pending:
                got[index] = self.to_rgb(frame, size)
                pending.discard(index)
            if index >= last or not pending:
                break
        if not decoded_any:
            raise VideoError("no decodable frames")
        if pending and latest is not None:  # past the end: repeat the last frame
            fill = self.to_rgb(latest[1], size)
            for index in pending:
                got[index] = got.get(latest[0], fill) if index < latest[0] else fill
        return np.stack([got[int(i)] for i in indices])

    def _read_from_start(self, wanted: list[int], indices: Sequence[int], size: tuple[int, int] | None) -> np.ndarray:
        got: dict[int, np.ndarray] = {}
        last = None
        for position, frame in enumerate(self.frames()):
            last = frame
            if position in wanted:
                got[position] = self.to_rgb(frame, size)
            if position >= wanted[-1]:
                break
        if last is None:
            raise VideoError("no decodable frames")
        fill = self.to_rgb(last, size)
        return np.stack([got.get(int(i), fill) for i in indices])


def _short(err: BaseException) -> str:
    # FFmpeg errors carry the message without the errno and file name that str() adds.
    text = (getattr(err, "strerror", None) or str(err)).strip() or type(err).__name__
    return text.splitlines()[0][:200]


def window_indices(
    num_available: int, num_frames: int, sampling_rate: int, rng: np.random.Generator | None
) -> np.ndarray:
    """Frame indices of one clip: ``num_frames`` frames ``sampling_rate`` apart.

    Training (``rng`` given) takes one random window; ``rng=None`` takes the centred window. A video
    shorter than the window starts at 0 and repeats its last frame, as the reference loader does.
    """
    if num_available < 1:
        raise ValueError("num_available must be >= 1")
    span = (num_frames - 1) * sampling_rate + 1
    slack = num_available - span
    if slack >= 0:
        start = int(rng.integers(0, slack + 1)) if rng is not None else slack // 2
    else:
        start = 0
    return np.minimum(start + np.arange(num_frames) * sampling_rate, num_available - 1)


def short_side_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side ``short_side`` and the aspect kept, both even (H.264 4:2:0)."""
    if short_side <= 0:
        return height - height % 2, width - width % 2
    scale = short_side / min(width, height)
    new_w = max(2, int(round(width * scale / 2)) * 2)
    new_h = max(2, int(round(height * scale / 2)) * 2)
    return new_h, new_w


class Mp4Encoder:
    """Frames → H.264 mp4 bytes at ``width × height``, constant frame rate, single-threaded (parallelism
    comes from worker processes). ``gop`` bounds how far a reader decodes after a seek.

    The same frames give the same bytes on every run and in every process (with the same libx264 on the same kind
    of CPU): x264's macroblock-tree rate control (``mbtree``) is off, because with it on, about one encode in
    fifteen of the same frames came out different (never with x264's assembly off: a read of memory it did not
    write), so shards written by the local pool, Ray or to object storage differed. Measured on 4 real videos at
    short side 256, crf 23: mbtree off stores 6% more bytes at the same PSNR (within 0.5 dB either way) and encodes
    7% faster."""

    def __init__(
        self,
        width: int,
        height: int,
        fps: float | Fraction,
        crf: int = 23,
        preset: str = "veryfast",
        gop: int = 16,
        tune: str | None = "fastdecode",
    ):
        self.width, self.height = width, height
        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="mp4")
        rate = Fraction(fps).limit_denominator(100_000)
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.tick = 1 / rate
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        # No B-pyramid: every B-frame is a non-reference picture, which a reader may leave undecoded.
        options: dict[str, str] = {
            "crf": str(crf),
            "preset": preset,
            "g": str(gop),
            "threads": "1",
            "b-pyramid": "none",
            "x264-params": "mbtree=0",  # reproducible bytes (see above)
        }
        if tune:
            options["tune"] = tune
        self.stream.options = options  # type: ignore[assignment]  # av's stub says dict[str, object]
        self.stream.codec_context.thread_count = 1
        self.count = 0
        self._reformatter = VideoReformatter()

    def add(self, frame: np.ndarray | av.VideoFrame) -> None:
        """An RGB ``[H, W, 3]`` array or a decoded frame of any size (scaled here)."""
        if isinstance(frame, np.ndarray):
            frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        scaled = self._reformatter.reformat(
            frame, width=self.width, height=self.height, format="yuv420p", interpolation="AREA"
        )
        # A fresh frame: a decoded frame carries its picture type, which would force the source's key
        # frames on x264; only ``gop`` decides key frames here.
        frame = av.VideoFrame.from_ndarray(scaled.to_ndarray(), format="yuv420p")
        frame.pts = self.count
        frame.time_base = self.tick  # one tick per frame
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.count += 1

    def finish(self) -> bytes:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        return self.buffer.getvalue()


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "JPEG":
            raise VideoError(f"expected JPEG bytes, got {image.format}")
        return np.asarray(image.convert("RGB"))


def read_window(
    source: str | Path | bytes,
    num_frames: int,
    sampling_rate: int,
    rng: np.random.Generator | None,
    frame_count: int | None = None,
) -> np.ndarray:
    """One clip from a video file or mp4 bytes: the frames of ``window_indices``.

    ``frame_count`` (e.g. from a shard's JSON) avoids trusting the container's declared count.
    """
    with VideoReader(source) as reader:
        available = frame_count or reader.info.num_frames
        if not available:
            available = max(1, int(reader.info.duration * reader.info.fps))
        indices = window_indices(available, num_frames, sampling_rate, rng)
        return reader.read_indices(indices.tolist())
