"""
Reading pixels: frame-exact video decoding (PyAV's seeking reader when PyAV is installed, else OpenCV's; the
same frames), images with Pillow (EXIF, odd modes, JPEGs decoded only as large as needed), and the crop boxes
of training and testing. Nothing here knows about datasets;
data.py decides which frames and which boxes.

A box is (y0, x0, h, w) in the original pixels; only that region is resized to the output, which equals
resizing the whole frame and then cropping, up to rounding, for less work.
"""

import collections
import itertools
import logging
import math
import os
import struct
import sys

# FFmpeg prints a line per broken packet and OpenCV a warning per unopenable file; data.py reports every
# unreadable file itself, once. Set these variables to override.
os.environ.setdefault('OPENCV_FFMPEG_LOGLEVEL', '-8')  # AV_LOG_QUIET
os.environ.setdefault('OPENCV_LOG_LEVEL', 'ERROR')

import cv2  # noqa: E402  (after the variables above)
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

try:  # optional (pip install av): decoding from keyframes instead of from the start
    import av
except ImportError:
    av = None

log = logging.getLogger(__name__)


class SampleError(Exception):
    """One file cannot be read; the dataset replaces it (train) or flags it (eval)."""


class VideoError(SampleError):
    def __init__(self, msg, num_frames=None):
        super().__init__(msg)
        self.num_frames = num_frames  # set when the video ended early: its true length


# What a broken file can raise while we decode it; bugs of our own (TypeError, ...) surface instead.
READ_ERRORS = (SampleError, OSError, ValueError, SyntaxError, EOFError, struct.error, cv2.error,
               Image.DecompressionBombError, *([av.FFmpegError] if av else []))

# -----------------------------------------------------------------------------
# videos. Frame i is the i-th frame that a decode from the start shows, and the length is how many it shows,
# whatever the process read before. Two readers, the same frames: PyAV's (an optional install, used when
# importable) decodes from the keyframe before each wanted frame; OpenCV's decodes from the start. Each opens
# the file once per sample; what the first open of a file learns (PyAV's packet list, OpenCV's count) is kept
# per process (KNOWN).

BACKEND = 'pyav' if av else 'opencv'


def reader():
    """Which reader decodes videos, in words, for the start-up report."""
    if BACKEND == 'pyav':
        return f"PyAV {av.__version__}: decodes from the keyframe before each frame"
    return f"OpenCV {cv2.__version__}: decodes from the start (pip install av: decodes from keyframes)"


def open_video(path):
    """An open video: .length (frames), .fps, .read(indices), and close() (or use it in a with block)."""
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    stat = os.stat(path)
    if stat.st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    key = (path, stat.st_size, stat.st_mtime_ns, stat.st_ino)  # a file written again is another file
    return PyAVVideo(path, key) if BACKEND == 'pyav' else OpenCVVideo(path, key)


def read_video(path, indices):
    """uint8 (len(indices), H, W, 3) RGB: exactly the frames at those 0-based indices, in any order."""
    with open_video(path) as v:
        return v.read(indices)


def video_info(path):
    """(frames, fps). Frames: what a decode from the start shows (of a truncated file, the reader may tell
    fewer when a read runs into the cut: VideoError.num_frames)."""
    with open_video(path) as v:
        return v.length, v.fps


class Video:
    """What both readers share: read(indices) asks the reader's frames(sorted unique indices) for {i: RGB}."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_fps(self, fps):
        if math.isfinite(fps) and 0 < fps < 1000:  # broken webm headers say 1000
            return fps
        if self.path not in _FPS_WARNED:  # once per file and process, not at every sample
            _FPS_WARNED.add(self.path)
            log.warning(f"{self.path}: unusable fps {fps} in the header, assuming 30")
        return 30.0

    def read(self, indices):
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size == 0 or indices.min() < 0:
            raise ValueError(f"need non-negative frame indices, got {indices}")
        kept = self.frames(sorted(set(indices.tolist())))
        return np.stack([kept[i] for i in indices.tolist()])  # (T, H, W, 3)

    def ends(self, last, n):
        return VideoError(f"{self.path}: frame {last} requested but the video ends after {n} frames",
                          num_frames=n)


_FPS_WARNED = set()


class OpenCVVideo(Video):
    """Never seeks (OpenCV's seeks are exact only at keyframes on some codecs, and number frames by the
    frame rate): decodes from the start, grab() for the frames it skips (no colour conversion), retrieve()
    for the ones it keeps. The length is counted, by grab() to the end at the file's first open in a process
    (a header's count may be an estimate, or count pictures a decoder drops), and kept in KNOWN."""

    def __init__(self, path, key):
        self.path, self.key, self.used = path, (*key, 'opencv'), False
        self.cap = self.open()
        self.fps = self.check_fps(header(self.cap)[1])
        self.counted = KNOWN.get(self.key)

    def open(self):
        # one decoder thread: the parallelism comes from DataLoader workers
        cap = cv2.VideoCapture(self.path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
        if not cap.isOpened():
            raise VideoError(f"{self.path}: FFmpeg cannot open it (corrupt, truncated or not a video)")
        return cap

    def rewind(self):
        if self.used:
            self.cap.release()
            self.cap = self.open()
        self.used = True

    @property
    def length(self):
        if self.counted is None:
            self.rewind()
            n = 0
            while self.cap.grab():
                n += 1
            if n == 0:
                raise VideoError(f"{self.path}: no decodable frames")
            self.learn(n)
        return self.counted

    def learn(self, n):
        self.counted = n
        KNOWN.add(self.key, n)

    def frames(self, wanted):
        if self.counted is not None and wanted[-1] >= self.counted:
            raise self.ends(wanted[-1], self.counted)
        self.rewind()
        kept, want = {}, set(wanted)
        for i in range(wanted[-1] + 1):
            if not self.cap.grab():
                if i:  # the decode ended: its length, as counting it would have found
                    self.learn(i)
                raise self.ends(wanted[-1], i)
            if i in want:
                ok, frame = self.cap.retrieve()
                if not ok or frame is None:
                    raise VideoError(f"{self.path}: frame {i} could not be converted")
                kept[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        return kept

    def close(self):
        self.cap.release()


def header(cap):  # (frame count, fps), as the file states them
    return int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), float(cap.get(cv2.CAP_PROP_FPS))


# Pixel formats whose RGB conversion by PyAV's libswscale equals OpenCV's to the bit; others (10-bit,
# semi-planar) may round differently, so OpenCV decodes those files.
SAME_RGB = {'yuv420p', 'yuvj420p', 'yuv422p', 'yuvj422p', 'yuv444p', 'yuvj444p', 'gray', 'pal8', 'rgb24',
            'bgr24', 'bgr0', 'rgb0'}


class PyAVVideo(Video):
    """Lists the packets (timestamps and keyframe flags only: no packet kept) and numbers the frames by their
    sorted timestamps, where a decode from the start at listing shows that this numbering holds
    (check_numbering), once per file and process (KNOWN). Each wanted frame is decoded from the last keyframe
    at or before it (a seek), unless the decoder is already on its way there. Every packet after a seek must
    be the one the list has there, and every frame decoded must carry the timestamp its number expects; where
    the numbering does not hold, or any of this fails, the file is decoded from the start, as OpenCVVideo does
    (the same frames either way). Only the kept frames are converted to RGB (libswscale, as OpenCV)."""

    def __init__(self, path, key):
        self.path, self.container, self.opencv = path, None, None
        try:
            self.known = KNOWN.get(key) or self.list_packets()
            KNOWN.add(key, self.known)
            self.length, self.fps = self.known.length, self.known.fps
            if self.known.opencv:  # reads the frames; PyAV counted them
                self.opencv = OpenCVVideo(path, key)
        except BaseException:
            self.close()
            raise

    def open(self):
        if self.container:  # again: the surest way back to the first packet
            self.container.close()
        try:
            self.container = av.open(self.path)
        except (av.FFmpegError, UnicodeDecodeError):
            raise VideoError(f"{self.path}: FFmpeg cannot open it (corrupt, truncated or not a video)") \
                from None
        cover_art = av.stream.Disposition.attached_pic
        self.stream = next((s for s in self.container.streams.video if not s.disposition & cover_art), None)
        if self.stream is None:
            raise VideoError(f"{self.path}: no video stream")
        self.decoder = self.stream.codec_context
        if self.decoder is None:  # a codec FFmpeg has no decoder for (an AVI's unknown fourcc)
            raise VideoError(f"{self.path}: FFmpeg has no decoder for its video codec")
        self.decoder.thread_count = 1  # the parallelism comes from DataLoader workers
        self.to_rgb = av.video.reformatter.VideoReformatter()  # one conversion set-up for all frames

    def demux(self):
        return (p for p in self.container.demux(self.stream) if p.size)  # the end: an empty packet

    def list_packets(self):
        """What the file's packets say, read through once, and what a decode from the start shows of them
        (check_numbering): a PacketList."""
        self.open()
        rows, corrupt, first = [], False, None  # rows: [pts, dts, keyframe, shown] in decoding order; shown is
        try:                                    # False for packets an edit list discards (decoded, never shown)
            for p in self.demux():
                rows.append([p.pts, p.dts, p.is_keyframe, not p.is_discard])
                corrupt = corrupt or p.is_corrupt
                if first is None:  # decoded on the way: the first frame a decode shows
                    first = next(iter(self.decode(p)), None)
        except av.FFmpegError:
            pass  # a truncated file: what could be read is what there is
        length, exact, matrix = self.check_numbering(rows, corrupt, first)
        if length <= 0:
            raise VideoError(f"{self.path}: no decodable frames")
        fps = self.stream.average_rate or self.stream.guessed_rate
        same_rgb = bool(self.decoder.format) and self.decoder.format.name in SAME_RGB
        return PacketList(rows, length, exact, self.check_fps(float(fps) if fps else 0.0),
                          opencv_turns(self.path) if matrix else 0, opencv=not same_rgb)

    def check_numbering(self, rows, corrupt, first):
        """Which packets a decode from the start shows, found by decoding as far as it takes (docs/performance.md):
        nothing more where the first frame shown is the first listed, the first keyframe's group where that
        may drop pictures, the whole file where its packets cannot tell. Marks the others not shown.
        -> (length, exact: the frames shown are the packets left, in timestamp order, display matrix)."""
        keys = [q for q, r in enumerate(rows) if r[2] and r[3]]
        group = keys[1] if len(keys) > 1 else len(rows)  # where the first keyframe's group ends
        if not corrupt and keys and in_order(rows, keys, group):
            start = rows[keys[0]][0]
            leading = any(r[3] and (q < keys[0] or r[0] is None or r[0] < start) for q, r in enumerate(rows[:group]))
            smallest = min(r[0] for r in rows if r[3] and r[0] is not None)
            if not leading and first is not None and first.pts == smallest:
                return sum(r[3] for r in rows), True, has_matrix(first)
            listed = [r[3] for r in rows]
            shown, matrix = self.shown_pts(group)
            dropped = mark_dropped(rows, group, shown)
            if timestamp_order(shown, rows, group) and group - 1 not in dropped:  # recovered within the group
                return sum(r[3] for r in rows), True, matrix
            for r, was in zip(rows, listed):
                r[3] = was
        shown, matrix = self.shown_pts(len(rows))
        mark_dropped(rows, len(rows), shown)
        return len(shown), timestamp_order(shown, rows, len(rows)), matrix

    def shown_pts(self, end):
        """The pts of the frames a decode from the start shows from the packets before position `end` (the
        decoder drained), in the order shown; whether the first carries a display matrix."""
        self.open()
        shown, matrix, packets = [], False, self.demux()
        for q in range(end):
            packet = next(packets, None)
            frames = self.decode(packet, last=q == end - 1)
            if frames and not shown:
                matrix = has_matrix(frames[0])
            shown += [f.pts for f in frames]
            if packet is None:
                break
        return shown, matrix

    def frames(self, wanted):
        if self.opencv:
            return self.opencv.frames(wanted)
        if self.known.exact and wanted[-1] < self.length:
            if self.container is None:
                self.open()
            kept = self.seek_and_decode(wanted)
            if kept is not None:
                return kept
            self.known.exact = False  # a seek here shows other frames: from the start from now on (the same
        return self.decode_from_start(wanted)  # frames, without a failed seek first)

    def seek_and_decode(self, wanted):
        """{i: RGB frame i} for the wanted frames (ascending), or None where the numbering proves wrong."""
        k, kept, want, fed = self.known, {}, set(wanted), None  # fed: the position of the last packet decoded
        for i in wanted:
            start = k.start(i)
            if fed is None or start > fed + 1:  # not on its way to frame i: go to that keyframe
                packets, at = self.seek(start)
                if packets is None:
                    return None
                fed, first = at - 1, int(k.pts[at]) if at else None
                expect = k.number(first) if at else 0
            while i not in kept:
                packet = next(packets, None)
                if packet is None:  # past the last packet: nothing to drain any more
                    return None
                fed += 1
                if fed == len(k.pts) or stamp(packet.pts) != k.pts[fed]:
                    return None  # not the packet listed there (dts may be guessed anew after a seek)
                for frame in self.decode(packet, last=fed == len(k.pts) - 1):
                    if first is not None and frame.pts is not None and frame.pts < first:
                        continue  # shown before the keyframe but decoded after it: not ours to check
                    if expect >= k.length or frame.pts != k.frame_pts[expect]:
                        return None
                    if expect in want:
                        kept[expect] = self.rgb(frame)
                    expect += 1
        return kept

    def seek(self, q):
        """The demuxer and the decoder moved to the keyframe at decoding position q (or to one before it)
        -> (its packets from there, the position of the first), or (None, None) where no seek lands there."""
        k = self.known
        for target in (k.pts[q], k.dts[q]):  # most containers seek by pts; some (MPEG-TS) only land by dts
            if target == NO_PTS:
                continue
            try:  # to the last keyframe at or before that time
                self.container.seek(int(target), stream=self.stream)
            except av.FFmpegError:
                continue
            self.decoder.flush_buffers()
            packets = self.demux()
            landed = next(packets, None)
            same = [] if landed is None else np.flatnonzero(k.pts[:q + 1] == stamp(landed.pts))
            if len(same) and k.is_keyframe(same[-1]):  # that keyframe or one before it, never after
                return itertools.chain([landed], packets), int(same[-1])
        return None, None

    def decode_from_start(self, wanted):
        kept, want, i = {}, set(wanted), 0
        self.open()
        for packet in itertools.chain(self.demux(), [None]):  # None: drain the decoder
            for frame in self.decode(packet):
                if i in want:
                    kept[i] = self.rgb(frame)
                i += 1
                if i > wanted[-1]:
                    return kept
        raise self.ends(wanted[-1], i)

    def decode(self, packet, last=False):
        """The frames one packet completes (the last packet, or None, also drains the decoder)."""
        frames = self.send(packet)
        return frames + self.send(None) if last and packet is not None else frames

    def send(self, packet):
        try:
            return self.decoder.decode(packet)
        except av.FFmpegError:  # a broken packet gives no frame and decoding goes on, as in OpenCV
            return []

    def rgb(self, frame):
        rgb = self.to_rgb.reformat(frame, format='rgb24').to_ndarray()
        return np.rot90(rgb, self.known.turns) if self.known.turns else rgb  # as OpenCV shows it

    def close(self):
        if self.container:
            self.container.close()
        if self.opencv:
            self.opencv.close()


def has_matrix(frame):
    return frame.side_data.get('DISPLAYMATRIX') is not None


def opencv_turns(path):
    """Counter-clockwise quarter turns that show a video's frames as OpenCV shows them: by the stream's display
    matrix alone (not by a display-orientation SEI, which a decoder puts on the frames that carry it), where its
    angle in whole degrees is a multiple of 90; PyAV cannot read the stream's matrix, so OpenCV is asked."""
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    angle = int(cap.get(cv2.CAP_PROP_ORIENTATION_META)) if cap.isOpened() else 0  # clockwise
    cap.release()
    return {90: 3, 180: 2, 270: 1}.get(angle, 0)


def in_order(rows, keys, group):
    """Whether the packets tell, without a decode, that a decoder shows every one after the first keyframe's group
    (which ends at position `group`), in timestamp order: each has a timestamp of its own, dts only grow, and
    nothing after a later keyframe is shown before it (closed groups: a decoder drops the leading pictures of a
    keyframe whose group before is not the one they refer to, as where two cuts were joined)."""
    pts = [r[0] for r in rows if r[3] and r[0] is not None]
    dts = [r[1] for r in rows if r[1] is not None]
    if rows[keys[0]][0] is None or any(r[3] and r[0] is None for r in rows[group:]) or len(set(pts)) < len(pts) \
            or any(a >= b for a, b in zip(dts, dts[1:])):
        return False
    shown = np.array([r[0] if r[3] and r[0] is not None else NOT_SHOWN for r in rows], np.int64)
    after = np.minimum.accumulate(shown[::-1])[::-1]  # the smallest pts shown from each position on
    return all(after[k] == shown[k] for k in keys[1:])


def mark_dropped(rows, end, shown):
    """Marks not shown the packets before position `end` whose frame a decode did not show -> their positions."""
    seen = set(shown)
    dropped = {q for q in range(end) if rows[q][3] and (rows[q][0] is None or rows[q][0] not in seen)}
    for q in dropped:
        rows[q][3] = False
    return dropped


def timestamp_order(shown, rows, end):
    """Whether a decode showed exactly the packets left before position `end`, in timestamp order."""
    return None not in shown and all(a < b for a, b in zip(shown, shown[1:])) and \
        shown == sorted(r[0] for r in rows[:end] if r[3])


NO_PTS = np.iinfo(np.int64).min  # a missing timestamp, in a PacketList
NOT_SHOWN = np.iinfo(np.int64).max


def stamp(t):
    return NO_PTS if t is None else t


NONE = np.zeros(0, np.int64)  # the arrays of a list that does not number the frames: one, shared


class PacketList:
    """What a video's packets say, in arrays (a few bytes a frame, so a process keeps many): the length and fps;
    the quarter turns that show its frames upright; whether OpenCV decodes the frames (PyAV's RGB may round
    otherwise); whether the frames can be numbered by timestamp (exact), and then per packet in decoding order
    its pts and dts, frame i's pts and the position of its packet, and the positions a decode may start from
    (the keyframes, and position 0)."""

    __slots__ = ('length', 'exact', 'fps', 'turns', 'opencv', 'pts', 'dts', 'frame_pts', 'frame_at', 'keyframes')

    def __init__(self, rows, length, exact, fps, turns, opencv):
        self.length, self.exact, self.fps, self.turns, self.opencv = length, exact, fps, turns, opencv
        self.pts = self.dts = self.frame_pts = self.frame_at = self.keyframes = NONE
        if exact:
            shown = [r[0] for r in rows if r[3]]
            self.pts = np.array([stamp(r[0]) for r in rows], np.int64)
            self.dts = np.array([stamp(r[1]) for r in rows], np.int64)
            order = np.argsort(shown)
            self.frame_pts = np.array(shown, np.int64)[order]  # frame i is shown at frame_pts[i]
            self.frame_at = np.array([q for q, r in enumerate(rows) if r[3]], np.int64)[order]  # from this packet
            self.keyframes = np.array([q for q, r in enumerate(rows) if q == 0 or (r[2] and r[3])], np.int64)

    @property
    def nbytes(self):
        """The bytes of its arrays (the object itself: Known's ENTRY_BYTES)."""
        arrays = (self.pts, self.dts, self.frame_pts, self.frame_at, self.keyframes)
        return sum(ARRAY_BYTES + a.nbytes for a in arrays if a is not NONE)

    def number(self, pts):
        """The frame shown at `pts`."""
        return int(np.searchsorted(self.frame_pts, pts))

    def start(self, i):
        """Where a decode that shows frame i starts: the last keyframe before it both in decoding and in
        showing order."""
        j = int(np.searchsorted(self.keyframes, self.frame_at[i], 'right')) - 1
        while j and self.pts[self.keyframes[j]] > self.frame_pts[i]:
            j -= 1
        return int(self.keyframes[j])

    def is_keyframe(self, q):
        j = np.searchsorted(self.keyframes, q)
        return j < len(self.keyframes) and self.keyframes[j] == q


# What an entry of Known takes beyond its path's string and its arrays' bytes, as tracemalloc counts it (an
# upper bound, tests/test_video.py): the key's tuple and numbers, the ordered dict's entry, a PacketList or a
# count; and each numpy array's header.
ENTRY_BYTES = 550
ARRAY_BYTES = 112


class Known:
    """What videos taught this process (a DataLoader worker has its own), by (path, size, mtime, inode): PyAV's
    PacketLists and OpenCV's counts, up to `limit` bytes of memory, the least recently used let go first. A
    video read again (another clip, another epoch) is not listed or counted again, and one where a seek
    proved wrong is not tried again. What an entry says does not depend on what was read before."""

    def __init__(self, limit):
        self.limit, self.lists, self.bytes = limit, collections.OrderedDict(), 0

    def get(self, key):
        if key in self.lists:
            self.lists.move_to_end(key)
        return self.lists.get(key)

    def add(self, key, value):
        if key not in self.lists:
            self.lists[key] = value
            self.bytes += entry_bytes(key, value)
        while self.bytes > self.limit:
            self.bytes -= entry_bytes(*self.lists.popitem(last=False))


def entry_bytes(key, value):
    return ENTRY_BYTES + sys.getsizeof(key[0]) + getattr(value, 'nbytes', 0)


KNOWN = Known(64 * 2**20)  # Known(0): every open lists the packets anew

# -----------------------------------------------------------------------------
# images


def load_image(path, reduce=1.0):
    """uint8 (H, W, 3) RGB, EXIF orientation applied; see rgb_image."""
    with Image.open(path) as im:
        return np.asarray(rgb_image(im, reduce))


def rgb_image(im, reduce=1.0):
    """An opened Pillow image, decoded, in mode RGB. reduce > 1: a JPEG may come back up to that many times
    smaller per side (decoded at 1/2, 1/4 or 1/8 scale, skipping most of the work). Transparency is
    composited on white, as a browser shows it; truncated files raise rather than fill with grey."""
    if reduce >= 2:
        im.draft(None, (math.ceil(im.width / reduce), math.ceil(im.height / reduce)))  # JPEG only
    im.load()
    ImageOps.exif_transpose(im, in_place=True)
    if im.mode == 'RGB':
        return im
    if im.mode.startswith('I') or im.mode == 'F':
        a = np.asarray(im, dtype=np.float32) / (257.0 if im.mode != 'F' else 1.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert('RGB')
    if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info:
        rgba = np.asarray(im.convert('RGBA'), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        return Image.fromarray(np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8))
    return im.convert('RGB')


def image_size(im):
    """(H, W) of an opened image as displayed, EXIF orientation applied. A JPEG keeps its EXIF before the
    pixels, so nothing is decoded yet; other formats may keep it after them and are decoded first."""
    if im.format != 'JPEG':
        im.load()
    W, H = im.size
    return (W, H) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (H, W)  # turned by 90 degrees


def image_crops(im, boxes, out):
    """uint8 (len(boxes), out, out, 3): the boxes (in displayed pixels) of an opened image, each resized
    to out x out. A JPEG is decoded only as large as each box needs, and each box's crop is the one it
    gets alone: boxes that need the same decode size share one decode, others open the file again."""
    H, W = image_size(im)
    reduce = [min(b[2], b[3]) / out for b in boxes]
    scales = [draft_scale(im, r) for r in reduce]
    crops = [None] * len(boxes)
    for s in sorted(set(scales)):
        mine = [i for i, t in enumerate(scales) if t == s]
        source = im if s == scales[0] else Image.open(im.filename)
        img = np.asarray(rgb_image(source, reduce=reduce[mine[0]]))
        if source is not im:
            source.close()
        sy, sx = img.shape[0] / H, img.shape[1] / W  # decoded size over displayed size
        for i in mine:
            y0, x0, bh, bw = boxes[i]
            crops[i] = crop_resize(img[None], (y0 * sy, x0 * sx, bh * sy, bw * sx), out)[0]
    return np.stack(crops)


def draft_scale(im, reduce):
    """1, 2, 4 or 8: how many times smaller per side rgb_image(im, reduce) decodes, without decoding.
    Pillow's JPEG draft rule: the largest of these that still covers the size asked for."""
    if im.format != 'JPEG' or reduce < 2:
        return 1
    fit = min(im.width // math.ceil(im.width / reduce), im.height // math.ceil(im.height / reduce))
    return next(s for s in (8, 4, 2, 1) if fit >= s)

# -----------------------------------------------------------------------------
# crops


def crop_resize(frames, box, out):
    """(T, H, W, 3) uint8 -> (T, out, out, 3): the box, rounded to whole pixels, resized."""
    H, W = frames.shape[1:3]
    bh, bw = max(1, min(H, round(box[2]))), max(1, min(W, round(box[3])))
    y0, x0 = min(max(0, round(box[0])), H - bh), min(max(0, round(box[1])), W - bw)
    # bilinear aliases when shrinking by more than 2x (1080p sources); area averaging does not
    interp = cv2.INTER_AREA if min(bh, bw) > 2 * out else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f[y0:y0 + bh, x0:x0 + bw], (out, out), interpolation=interp) for f in frames])


def train_video_box(h, w, img_size, rng):
    """Short side scaled to a random integer in [img*256/224, img*320/224], random img x img crop."""
    short = int(rng.integers(round(img_size * 256 / 224), round(img_size * 320 / 224) + 1))
    side = img_size * min(h, w) / short  # the crop's side in original pixels
    return rng.uniform(0, h - side), rng.uniform(0, w - side), side, side


def random_resized_box(h, w, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop: area fraction in `scale`, log-uniform aspect ratio, 10 tries, then a centre
    crop with the aspect ratio clamped into `ratio`."""
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        bw, bh = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < bw <= w and 0 < bh <= h:
            return int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw
    if w / h < ratio[0]:
        bw, bh = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        bw, bh = round(h * ratio[1]), h
    else:
        bw, bh = w, h
    return (h - bh) // 2, (w - bw) // 2, bh, bw


def eval_video_boxes(h, w, crops):
    """Short side -> img, then `crops` squares along the long side (left/centre/right, or top/centre/
    bottom for portrait); one crop is the centre one."""
    side = min(h, w)
    offsets = [(max(h, w) - side) / 2] if crops == 1 else np.linspace(0, max(h, w) - side, crops)
    return [(o, 0, side, side) if h > w else (0, o, side, side) for o in offsets]


def eval_image_box(h, w, img_size):
    """ImageNet convention: short side to img*256/224, centre img x img crop."""
    side = img_size * min(h, w) / round(img_size * 256 / 224)
    return (h - side) / 2, (w - side) / 2, side, side


def hflip(frames):
    """(T, H, W, 3) mirrored left to right."""
    return np.ascontiguousarray(frames[:, :, ::-1])
