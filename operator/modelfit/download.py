"""The ``fetch-model`` init container: a POSIX sh script and its env. Pure: no I/O.

Kept apart from render.py because the script is code in its own right: it runs in a
curl + busybox image as uid 1000 on a read-only root filesystem, and tests/test_download.py
runs it against a local HTTP server. It verifies a cached file before reusing it,
resumes after any interruption, copes with servers that ignore Range, fetches every
shard of a split GGUF and renames ``.part`` to the final name only after verification.
On failure it writes one line, ``Reason: detail``, to the termination log; on success
``Verified: sha256 <digest> [<digest> ...]``, one per shard, which the operator records
(trust on first use) and holds every later pod to.

Env contract: MODEL_URL, MODEL_FILE (required); MODEL_SIZE, MODEL_SHA256 (optional, the
first or only shard); DIGEST_FILE (default /etc/modelfit/digest/sha256: the digests an earlier
pod's verified download recorded, one line per shard; MODEL_SHA256 wins for the first); HF_TOKEN (optional, sent as a Bearer header over https only, never printed, never
across a redirect to another host, port or scheme);
TERMINATION_LOG (default /dev/termination-log); CURL_RETRY_DELAY (seconds, default 1);
DOWNLOAD_ATTEMPTS (attempts without progress before giving up, default 8);
CURL_CONNECT_TIMEOUT (seconds, default 10).
"""

from __future__ import annotations

import re

# llama.cpp names split models "<prefix>-%05d-of-%05d.gguf" (see gguf_header._SPLIT_RE).
_FIRST_SHARD_NAME = re.compile(r"^(?P<prefix>.*)-00001-of-(?P<count>\d{5})\.gguf$")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIRST_SHARD_URL = re.compile(r"^(?P<prefix>.*?)-00001-of-(?P<count>\d{5})\.gguf(?P<rest>[?#].*)?$")

DOWNLOAD_SCRIPT = r"""set -eu
log=${TERMINATION_LOG:-/dev/termination-log}
delay=${CURL_RETRY_DELAY:-1}
attempts=${DOWNLOAD_ATTEMPTS:-8}
ctimeout=${CURL_CONNECT_TIMEOUT:-10}
fail() {
  echo "$1" >&2
  { printf '%s\n' "$1" > "$log"; } 2>/dev/null || true
  exit 1
}
isnum() { case "$1" in ''|*[!0-9]*) return 1;; esac; return 0; }
[ -n "${MODEL_URL:-}" ] || fail "InvalidSpec: MODEL_URL is empty"
[ -n "${MODEL_FILE:-}" ] || fail "InvalidSpec: MODEL_FILE is empty"
if [ -n "${HF_TOKEN:-}" ]; then
  case "$MODEL_URL" in
    https://*) ;;
    *) fail "InvalidSpec: a token (HF_TOKEN) goes over https only, never in clear text: $MODEL_URL" ;;
  esac
fi
want_size=${MODEL_SIZE:-}
digest_file=${DIGEST_FILE:-/etc/modelfit/digest/sha256}
# The digests recorded from an earlier verified download: one per shard, in order.
known=
if [ -r "$digest_file" ]; then
  known=$(grep -E '^[0-9a-f]{64}$' "$digest_file" 2>/dev/null | tr '\n' ' ') || known=
fi
known_sha() { echo $known | cut -d' ' -f"$1"; }
want_sha=${MODEL_SHA256:-$(known_sha 1)}
if [ -n "$want_size" ] && ! isnum "$want_size"; then fail "InvalidSpec: MODEL_SIZE is not a number: $want_size"; fi
for v in "$delay" "$attempts" "$ctimeout"; do
  isnum "$v" || fail "InvalidSpec: CURL_RETRY_DELAY, DOWNLOAD_ATTEMPTS and CURL_CONNECT_TIMEOUT must be numbers"
done
[ "$attempts" -ge 1 ] || attempts=1
maxtries=$((attempts * 8))
f=$MODEL_FILE
dir=${f%/*}
if [ "$dir" = "$f" ]; then dir=.; elif [ -z "$dir" ]; then dir=/; fi

# Fail early and clearly when the cache directory is not writable (a root-owned hostPath).
mkdir -p "$dir" 2>/dev/null || true
probe="$dir/.modelfit-write-test.$$"
if ! (: > "$probe") 2>/dev/null; then
  info=$(stat -c 'mode %a, owner uid %u gid %g' "$dir" 2>/dev/null) || info="cannot create the directory"
  fail "PermissionDenied: cannot write to $dir ($info; running as uid $(id -u 2>/dev/null || echo '?'))"
fi
rm -f "$probe"

fsize() {
  if [ -e "$1" ]; then stat -c %s "$1" 2>/dev/null || wc -c < "$1"; else echo 0; fi
}

# The token goes to curl on stdin as a config line: never in argv, never in the log. A custom header: curl
# (>= 7.83) drops it on a redirect to another host, port or scheme (a Hugging Face CDN's signed URL needs
# none), and with a token every hop is https (a redirect to http is refused: curl exit 1).
auth_config() {
  if [ -n "${HF_TOKEN:-}" ]; then
    printf 'header = "Authorization: Bearer %s"\nproto = "=https"\nproto-redir = "=https"\n' "$HF_TOKEN"
  fi
}

# verify PATH: checks size ($gs) and sha256 ($gh) when given; sets vkind (short|size|sha) and vmsg.
verify() {
  vsz=$(( $(fsize "$1") ))
  if [ -n "$gs" ] && [ "$vsz" -ne "$gs" ]; then
    vkind=size
    if [ "$vsz" -lt "$gs" ]; then vkind=short; fi
    vmsg="expected $gs bytes, got $vsz"
    return 1
  fi
  if [ "$vsz" -eq 0 ]; then vkind=size; vmsg="expected a non-empty file, got 0 bytes"; return 1; fi
  vmsg="$vsz bytes"
  vgot=
  if [ -n "$gh" ]; then
    vst=$(stamp "$1")
    vct=$(echo "$vst" | cut -d' ' -f2); vmt=$(stat -c %Y "$1.verified" 2>/dev/null || echo 0)
    if [ "$(cat "$1.verified" 2>/dev/null)" = "$gh $vst" ] && isnum "$vct" && [ "$vct" -lt "$vmt" ]; then
      vgot=$gh; vmsg="$vmsg, sha256 ok (verified by an earlier start; unchanged since)"; return 0
    fi
    echo "computing sha256 of $1"
    vgot=$(sha256sum "$1" | cut -d' ' -f1)
    if [ "$vgot" != "$gh" ]; then vkind=sha; vmsg="expected $gh, got $vgot"; return 1; fi
    vmsg="$vmsg, sha256 ok"
  fi
  return 0
}

# stamp FILE: what any change to the file changes (size, ctime, inode; ctime cannot be set back). Only this
# script writes the cache (llama-server mounts it read-only), so a file whose stamp matches the one written
# after its sha256 was verified is that content: a node cache's wake skips hashing it again. ctime has whole
# seconds here (busybox stat): a stamp is trusted only when the file changed last before the second the stamp
# was written, so a change within that second is hashed again.
stamp() { stat -c '%s %Z %i' "$1" 2>/dev/null || echo unknown; }

# record FILE: its sha256 (computed by verify, else now) joins the digests this pod reports on success.
digests=
record() {
  if [ -z "$vgot" ]; then vgot=$(sha256sum "$1" | cut -d' ' -f1); fi
  digests="$digests $vgot"
  { printf '%s %s\n' "$vgot" "$(stamp "$1")" > "$1.verified"; } 2>/dev/null || true
}

# get_file FILE URL SIZE SHA256: reuse a verified FILE, else download URL to FILE.part and rename.
get_file() {
  gf=$1; gu=$2; gs=$3; gh=$4; gp="$1.part"
  if [ -e "$gf" ]; then
    if verify "$gf"; then echo "reusing cached $gf ($vmsg)"; record "$gf"; return 0; fi
    if [ "$vkind" = short ]; then
      echo "cached $gf is truncated ($vmsg): resuming it"
      mv -f "$gf" "$gp"
    else
      echo "cached $gf is bad ($vmsg): deleting it and downloading again"
      rm -f "$gf"
    fi
  fi
  if [ -n "$gs" ] && [ "$(( $(fsize "$gp") ))" -gt "$gs" ]; then
    echo "$gp is larger than $gs bytes: deleting it"
    rm -f "$gp"
  fi
  best=$(( $(fsize "$gp") ))
  resumed=0
  if [ "$best" -gt 0 ]; then resumed=1; fi
  tries=0; stalls=0
  while :; do
    tries=$((tries + 1))
    have=$(( $(fsize "$gp") ))
    if [ "$have" -gt 0 ]; then echo "resuming $gu at byte $have (attempt $tries)"
    else echo "downloading $gu to $gf (attempt $tries)"; fi
    rc=0
    out=$(auth_config | curl -q -K - -fsSL -C - --connect-timeout "$ctimeout" --speed-limit 1024 --speed-time 60 \
      -o "$gp" -w '%{http_code} %{size_download} %{time_total}' "$gu") || rc=$?
    set -- ${out:-000 0 0}
    code=$1
    now=$(( $(fsize "$gp") ))
    echo "curl exit $rc, HTTP $code, $2 bytes in $3 s"
    err=
    done=0
    if [ "$code" = 416 ] && [ "$have" -gt 0 ]; then
      if [ "$now" -eq "$have" ]; then
        echo "HTTP 416 for a range from byte $have: $gp is already complete"
        done=1
      else
        echo "HTTP 416 changed $gp: starting over"
        rm -f "$gp"; resumed=0; best=0
        continue
      fi
    elif [ "$rc" -eq 0 ]; then
      done=1
    elif [ "$rc" -eq 33 ]; then
      echo "the server does not support ranges (curl exit 33): downloading $gu from byte 0"
      rm -f "$gp"; resumed=0
      continue
    elif [ "$rc" -eq 22 ]; then
      case "$code" in
        408|429|5??) err="HTTPError: HTTP $code for $gu" ;;
        *) fail "HTTPError: HTTP $code for $gu" ;;
      esac
    elif [ "$rc" -eq 1 ]; then
      fail "DownloadFailed: curl exit 1 (a protocol refused${HF_TOKEN:+: with a token every hop is https}) for $gu"
    elif [ "$rc" -eq 23 ]; then
      fail "WriteFailed: cannot write $gp (curl exit 23: disk full or not writable) for $gu"
    else
      err="DownloadFailed: curl exit $rc for $gu"
    fi
    if [ "$done" -eq 1 ]; then
      if verify "$gp"; then
        mv -f "$gp" "$gf"
        echo "verified $gf ($vmsg)"
        record "$gf"
        return 0
      fi
      rm -f "$gp"
      if [ "$resumed" -eq 1 ]; then
        echo "$gp failed verification after resuming an earlier partial download ($vmsg): downloading from byte 0"
        resumed=0; best=0; stalls=0
        continue
      fi
      if [ "$vkind" = sha ]; then fail "ChecksumMismatch: $vmsg for $gu"; fi
      fail "SizeMismatch: $vmsg for $gu"
    fi
    if [ "$now" -gt "$best" ]; then best=$now; stalls=0; else stalls=$((stalls + 1)); fi
    if [ "$stalls" -ge "$attempts" ] || [ "$tries" -ge "$maxtries" ]; then fail "$err after $tries attempts"; fi
    wait_s=$((delay * (stalls + 1)))
    if [ "$wait_s" -gt 30 ]; then wait_s=30; fi
    echo "$err; retrying in ${wait_s}s"
    sleep "$wait_s"
  done
}

# A split GGUF (<prefix>-00001-of-NNNNN.gguf): fetch every shard next to the first one.
base=${f##*/}
n=1
case "$base" in
  *-00001-of-[0-9][0-9][0-9][0-9][0-9].gguf)
    nstr=${base%.gguf}; nstr=${nstr##*-of-}
    n=$(echo "$nstr" | sed 's/^0*//'); n=${n:-0}
    if [ "$n" -lt 1 ]; then n=1; fi
    ;;
esac
if [ "$n" -gt 1 ]; then
  case "$MODEL_URL" in
    *"-00001-of-$nstr.gguf"*) ;;
    *) fail "InvalidSpec: $base is the first shard of a split GGUF but MODEL_URL has no -00001-of-$nstr.gguf: $MODEL_URL" ;;
  esac
  fprefix=${f%-00001-of-"$nstr".gguf}
  echo "split GGUF: $n shards"
fi
i=1
while [ "$i" -le "$n" ]; do
  if [ "$n" -eq 1 ]; then
    get_file "$f" "$MODEL_URL" "$want_size" "$want_sha"
  else
    s=$(printf '%05d' "$i")
    su=$(printf '%s\n' "$MODEL_URL" | sed "s/-00001-of-$nstr\.gguf/-$s-of-$nstr.gguf/")
    if [ "$i" -eq 1 ]; then
      get_file "$fprefix-$s-of-$nstr.gguf" "$su" "$want_size" "$want_sha"
    else
      get_file "$fprefix-$s-of-$nstr.gguf" "$su" "" "$(known_sha "$i")"
    fi
  fi
  i=$((i + 1))
done
echo "model ready: $f"
# The digests, for the operator to record (the kubelet keeps at most 4096 bytes of it).
report="Verified: sha256$digests"
if [ "${#report}" -le 4000 ]; then { printf '%s\n' "$report" > "$log"; } 2>/dev/null || true; fi
"""


DIGEST_DIR = "/etc/modelfit/digest"  # the recorded digests' ConfigMap, mounted into the init container
VERIFIED_PREFIX = "Verified: sha256"


def verified_digests(message: str | None) -> list[str] | None:
    """The digests a successful fetch-model reported in its termination message, or None."""
    text = (message or "").strip()
    if not text.startswith(VERIFIED_PREFIX):
        return None
    digests = text[len(VERIFIED_PREFIX) :].split()
    if not digests or not all(_SHA256.fullmatch(d) for d in digests):
        return None
    return digests


def download_env(url: str, file_path: str, size_bytes: int = 0, sha256: str | None = None) -> list[dict[str, str]]:
    """The init container's env (HF_TOKEN, from a Secret, is added by the renderer)."""
    env = [{"name": "MODEL_URL", "value": url}, {"name": "MODEL_FILE", "value": file_path}]
    if size_bytes > 0:
        env.append({"name": "MODEL_SIZE", "value": str(size_bytes)})
    if sha256:
        env.append({"name": "MODEL_SHA256", "value": sha256.strip().lower()})
    return env


def shard_urls(url: str) -> list[str]:
    """All shard URLs of a split GGUF whose first shard is ``url``, or just ``[url]``."""
    m = _FIRST_SHARD_URL.match(url)
    count = int(m.group("count")) if m else 0
    if m is None or count < 2:
        return [url]
    rest = m.group("rest") or ""
    return [f"{m.group('prefix')}-{i:05d}-of-{m.group('count')}.gguf{rest}" for i in range(1, count + 1)]


def shard_names(file_name: str) -> list[str]:
    """All shard file names of a split GGUF whose first shard is ``file_name``, or just ``[file_name]``."""
    m = _FIRST_SHARD_NAME.match(file_name)
    count = int(m.group("count")) if m else 0
    if m is None or count < 2:
        return [file_name]
    return [f"{m.group('prefix')}-{i:05d}-of-{m.group('count')}.gguf" for i in range(1, count + 1)]
