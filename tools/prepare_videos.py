"""
Re-encode a video dataset for fast training reads (optional: the loaders read the original files too).

Every video under SRC is written to the same relative path under DST, with:
  - the short side scaled to --short_side (default 320; never upscaled), aspect ratio kept;
  - a constant frame rate, the source's (unless that would duplicate or drop more than a tenth of the
    frames, as with broken timestamps or long pauses: then the source's timestamps are kept);
  - a keyframe exactly every --gop frames (default 4; no scene-cut keyframes) and no B-frames: video.py's
    PyAV reader decodes from the keyframe before each sampled frame, so a short interval buys clips/s per
    worker for a larger file (the trade measured in docs/performance.md);
  - H.264 tuned for decoding speed (x264 --tune fastdecode: CAVLC instead of CABAC, no deblocking
    filter), which matters more than a slightly larger file for data read every epoch; --no-fastdecode
    for the smallest files;
  - no audio, subtitle or data streams.
Every other file (annotation csv / json / txt) is copied as it is, so the copy is a dataset folder that
train.py and eval.py read the same way: point --data_dir at DST's parent.

File names never change, because the annotations name them (Kinetics CSVs give <id>_<start>_<end>.mp4,
SSv2's json files <id>.webm): .webm files are encoded as VP9 (the codecs WebM allows), every other
container (.mp4 .mkv .mov .avi) as H.264 in its own container.

  pip install imageio-ffmpeg    # the FFmpeg binary this script runs
  python tools/prepare_videos.py data/k400 data320/k400 --jobs 16
  python train.py --data_dir data320 ...

Outputs that exist are skipped, so an interrupted run resumes where it stopped (each output is written
under a temporary name and renamed when complete). Files that fail are listed one line each, and the
exit status is then 1.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

# the project's modules live in the parent folder
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from layouts import VIDEO_EXTS  # noqa: E402

PROGRESS_EVERY_S = 10.0
TMP_FOLDER = ".prepare_videos.tmp"  # in the output folder: renames stay on one file system


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.strip().split("\n\n", 1)[1])
    p.add_argument("src", help="dataset folder to read (e.g. data/k400)")
    p.add_argument("dst", help="mirror folder to write (e.g. data320/k400)")
    p.add_argument("--short_side", type=int, default=320, help="target short side in pixels (never upscaled)")
    p.add_argument("--gop", type=int, default=4, help="frames from one keyframe to the next")
    p.add_argument("--crf", type=int, default=23, help="H.264 quality (lower: better, larger files)")
    p.add_argument("--vp9_crf", type=int, default=32, help="VP9 quality for .webm files (its own scale)")
    p.add_argument("--preset", default="fast", help="x264 preset: slower ones make smaller files")
    p.add_argument("--fastdecode", action=argparse.BooleanOptionalAction, default=True,
                   help="x264 --tune fastdecode (default: on)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="files encoded at once, one core each")
    args = p.parse_args(argv)
    if args.short_side < 2 or args.gop < 1 or args.jobs < 1:
        p.error("--short_side must be >= 2, --gop and --jobs >= 1")
    return args


def ffmpeg_exe():
    """The FFmpeg binary of the imageio-ffmpeg package, or None when it is not installed."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    return imageio_ffmpeg.get_ffmpeg_exe()


def scale_filter(short_side):
    """Short side to min(itself, short_side), the other side by the aspect ratio; both even (4:2:0)."""
    short = f"trunc(min(min(iw,ih),{short_side})/2)*2"
    return f"scale=w='if(lt(iw,ih),{short},-2)':h='if(lt(iw,ih),-2,{short})':flags=area"


def encode_command(ffmpeg, src, dst, args, fps_mode="cfr"):
    ext = os.path.splitext(dst)[1].lower()
    # the stream's own first timestamp becomes 0: otherwise CFR would repeat the first frame to fill
    # the gap when audio starts before video
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-threads", "1", "-i", src,
           "-map", "0:V:0", "-an", "-sn", "-dn",  # V: the first real video stream, not cover art
           "-vf", f"setpts=PTS-STARTPTS,{scale_filter(args.short_side)},format=yuv420p",
           "-fps_mode", fps_mode, "-progress", "pipe:1", "-nostats",  # progress: frame counts on stdout
           "-g", str(args.gop), "-keyint_min", str(args.gop),
           "-force_key_frames", f"expr:eq(mod(n,{args.gop}),0)", "-threads", "1"]
    if ext == ".webm":
        cmd += ["-c:v", "libvpx-vp9", "-crf", str(args.vp9_crf), "-b:v", "0", "-deadline", "good",
                "-cpu-used", "4", "-row-mt", "0",
                "-auto-alt-ref", "0"]  # no hidden frames: each packet is one shown frame
    else:
        cmd += ["-c:v", "libx264", "-preset", args.preset, "-crf", str(args.crf), "-bf", "0",
                "-sc_threshold", "0"] + ["-tune", "fastdecode"] * args.fastdecode
    if ext in (".mp4", ".mov"):
        cmd += ["-movflags", "+faststart"]  # index first: a reader needs no second seek to the end
    return cmd + [dst]


def prepare_one(ffmpeg, src, dst, tmp, args):
    """Encode one video or copy one other file to dst, through the temporary file tmp (same extension:
    it picks the muxer) -> 'done' or 'skipped'; raises RuntimeError when FFmpeg fails."""
    if os.path.exists(dst):
        return "skipped"
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        if os.path.splitext(dst)[1].lower() in VIDEO_EXTS:
            encode(ffmpeg, src, tmp, args)
        else:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return "done"


def encode(ffmpeg, src, tmp, args):
    """Constant frame rate, unless FFmpeg had to duplicate or drop over a tenth of the frames for it: its
    frame rate guess was wrong (broken timestamps) or the video pauses. Then the timestamps are kept."""
    for fps_mode in ("cfr", "passthrough"):
        run = subprocess.run(encode_command(ffmpeg, src, tmp, args, fps_mode), capture_output=True, text=True)
        if run.returncode or not os.path.exists(tmp) or os.path.getsize(tmp) == 0:
            lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
            raise RuntimeError(lines[-1] if lines else f"ffmpeg exited with status {run.returncode}")
        stats = dict(ln.split("=", 1) for ln in run.stdout.splitlines() if "=" in ln)  # the last report
        if int(stats.get("frame", 0)) == 0:
            raise RuntimeError("no frame could be decoded")
        changed = int(stats.get("dup_frames", 0)) + int(stats.get("drop_frames", 0))
        if 10 * changed <= int(stats.get("frame", 0)):
            return


def find_files(src, dst):
    """Relative paths of the files under src, skipping dst when it lies inside src."""
    skip = os.path.realpath(dst)
    found = []
    for folder, dirs, files in os.walk(src, followlinks=True):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(folder, d)) != skip)
        found += [os.path.relpath(os.path.join(folder, f), src) for f in sorted(files)]
    return found


def main(argv=None):
    args = parse_args(argv)
    src, dst = os.path.abspath(args.src), os.path.abspath(args.dst)
    if not os.path.isdir(src):
        sys.exit(fail(f"no folder {src}"))
    if os.path.realpath(src) == os.path.realpath(dst):
        sys.exit(fail("the output folder must differ from the input folder"))
    ffmpeg = ffmpeg_exe()
    if ffmpeg is None:
        sys.exit(fail("needs the FFmpeg binary of imageio-ffmpeg: pip install imageio-ffmpeg"))
    files = find_files(src, dst)
    videos = sum(os.path.splitext(f)[1].lower() in VIDEO_EXTS for f in files)
    print(f"{src}: {videos} videos and {len(files) - videos} other files -> {dst} "
          f"(short side {args.short_side}, keyframe every {args.gop} frames, {args.jobs} jobs)", flush=True)
    t0 = time.time()
    counts, failed = prepare_all(ffmpeg, src, dst, files, args)
    sizes = f"{human(total_size(src, files))} -> {human(total_size(dst, files))}"
    print(f"{counts['done']} files written, {counts['skipped']} skipped (output exists), "
          f"{len(failed)} failed in {time.time() - t0:.0f} s; {sizes}", flush=True)
    if failed:
        sys.exit(fail(f"{len(failed)} files failed (listed above); run again to retry them"))


def prepare_all(ffmpeg, src, dst, files, args):
    """Every file through prepare_one, args.jobs at a time -> ({'done': n, 'skipped': n}, [failed]).
    Temporary files live in one hidden folder of dst, so no listing of dst ever sees a partial video."""
    tmp = os.path.join(dst, TMP_FOLDER)
    os.makedirs(tmp, exist_ok=True)
    counts, failed, t0 = {"done": 0, "skipped": 0}, [], time.time()
    last = t0
    with ThreadPoolExecutor(args.jobs) as pool:  # a thread per job, waiting on that job's ffmpeg process
        futures = {pool.submit(prepare_one, ffmpeg, os.path.join(src, f), os.path.join(dst, f),
                               os.path.join(tmp, f"{os.getpid()}-{i}{os.path.splitext(f)[1]}"), args): f
                   for i, f in enumerate(files)}
        try:
            for n, fut in enumerate(as_completed(futures), 1):
                try:
                    counts[fut.result()] += 1
                except (RuntimeError, OSError) as e:
                    failed.append(futures[fut])
                    print(f"FAILED {futures[fut]}: {e}", flush=True)
                if time.time() - last > PROGRESS_EVERY_S:
                    last = time.time()
                    rate = n / (last - t0)
                    print(f"{n}/{len(files)} files, {len(failed)} failed, {rate:.1f} files/s, "
                          f"{(len(files) - n) / rate / 60:.0f} min left", flush=True)
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)  # the running ffmpegs got the same Ctrl-C
            sys.exit(fail("interrupted; run the same command again to continue"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return counts, failed


def total_size(root, files):
    paths = (os.path.join(root, f) for f in files)
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p))


def human(n_bytes):
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{n_bytes} B"
        n_bytes /= 1000


def fail(msg):
    print(f"prepare_videos: error: {msg}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
