"""Every Triton kernel compiles for a real GPU target (sm_90) from its source, with no GPU present.

The CPU suite runs the kernels in Triton's interpreter, which accepts code the compiler rejects (and the
other way round); this test closes that gap by building each kernel ahead of time with `triton.compile`
down to PTX (front end, MLIR passes, LLVM; no ptxas, no driver), at the block sizes the launchers use. It runs in a subprocess because
test_triton.py needs `superlinear_kernels.triton` to be first imported under TRITON_INTERPRET=1, while
compiling needs the kernels defined without it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

# Only look for Triton here: importing it in this process (before test_triton.py sets TRITON_INTERPRET=1) makes
# the interpreter fail on every kernel later in the session ("Cannot call @triton.jit'd outside of the scope of a
# kernel"), as a whole-suite run showed.
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

_SCRIPT = textwrap.dedent('''
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.backends.nvidia.compiler import CUDABackend
    from superlinear_kernels.triton import common, decode, merge, search, span, window

    # Stop at PTX: the front end, MLIR passes and LLVM are what the interpreter skips; ptxas would double the time.
    CUDABackend.make_cubin = lambda self, src, metadata, *args, **kwargs: b""

    HALF = {"q_ptr", "k_ptr", "v_ptr", "q1_ptr", "out_ptr", "do_ptr", "res_ptr", "dq1_ptr"}  # the model dtype (fp16)
    I64 = {"pos_ptr", "start_ptr", "order_ptr", "mstripe_ptr", "table_ptr", "blen_ptr", "flen_ptr", "part_a_ptr",
           "spos_ptr", "qrange_ptr", "tile_lo_ptr", "tile_hi_ptr", "tile_in_ptr", "trange_ptr"}
    I32 = {"qstart_ptr", "qend_ptr", "qanchor_ptr", "anchor_ptr", "key_ptr"}
    FLOAT = {"scale", "qk_scale", "INVALID"}
    WIDE = ("sk_", "sv_")  # strides are int64

    def signature(fn, const):
        sig = {}
        for n in fn.arg_names:
            if n in const:
                sig[n] = "constexpr"
            elif n.endswith("_desc"):  # a TMA descriptor of a K or V cache [B, H_KV, L_KV, D], the kernel's blocks
                sig[n] = f"tensordesc<fp16[1, 1, {DESC_BLOCK_N[fn.__name__]}, {BD}]>"
            elif n.endswith("_ptr"):
                sig[n] = "*fp16" if n in HALF else "*i64" if n in I64 else "*i32" if n in I32 else "*fp32"
            else:
                sig[n] = "fp32" if n in FLOAT else "i64" if n.startswith(WIDE) else "i32"
        return sig

    # Block sizes from the launchers' own helpers (a 16-head KV group, D = 128, fp16), so a bad layout change
    # there is compiled here too.
    K, GROUP, D, LONG = 3, 16, 128, 4096
    BD = common.block_d(D)
    gh, bq, _ = search.search_layout(GROUP, LONG, D, 2)
    _, bq1, _ = search.search_layout(GROUP, 1, D, 2)
    wgh, wbq, _ = common.head_rows(GROUP, LONG)
    wfh, wfq, _ = common.head_rows(GROUP, LONG, window.FWD_ROWS)
    wkh, wkq, _ = common.head_rows(GROUP, LONG, window.KV_ROWS)
    sbd, sbn, sbp = span._blocks(D)
    DESC_BLOCK_N = {"_decode_group_kernel": decode.DECODE_BLOCK_N, "_window_fwd_kernel": window.FWD_BLOCK_N,
                    "_span_fwd_kernel": span.FWD_BLOCK_N}  # key rows of one TMA block
    KERNELS = [
        (search._search_kernel, dict(NUM_SPANS=K, KP=common.next_pow2(K), GH=gh, BQ=bq, SC=search.SEARCH_STRIPES,
                                     BLOCK_D=BD, IS_SPLIT=False, FIXED_TOP=False, KEYED=False, ORDERED=False,
                                     PRECISION="tf32", PDL=False)),
        (search._search_kernel, dict(NUM_SPANS=K, KP=common.next_pow2(K), GH=gh, BQ=bq, SC=search.SEARCH_STRIPES,
                                     BLOCK_D=BD, IS_SPLIT=False, FIXED_TOP=False, KEYED=True, ORDERED=False,
                                     PRECISION="tf32", PDL=False)),
        (search._search_kernel, dict(NUM_SPANS=K, KP=common.next_pow2(K), GH=gh, BQ=bq, SC=search.SEARCH_STRIPES,
                                     BLOCK_D=BD, IS_SPLIT=False, FIXED_TOP=False, KEYED=False, ORDERED=True,
                                     PRECISION="tf32", PDL=False)),
        (search._search_kernel, dict(NUM_SPANS=K, KP=common.next_pow2(K), GH=gh, BQ=bq1, SC=search.DECODE_STRIPES,
                                     BLOCK_D=BD, IS_SPLIT=True, FIXED_TOP=True, KEYED=False, ORDERED=False,
                                     PRECISION="tf32", PDL=True)),
        (search._search_merge_kernel, dict(NUM_SPANS=K, KP=common.next_pow2(K), BLOCK_R=4, BLOCK_C=128, PDL=True)),
        (search._search_bwd_kernel, dict(NUM_SPANS=K, BLOCK_R=32, BLOCK_D=BD, SEM="relaxed")),
        (window._window_fwd_kernel, dict(k_desc=None, v_desc=None, GH=wfh, BQ=wfq, BLOCK_N=window.FWD_BLOCK_N,
                                         BLOCK_D=BD, SPLIT=window.FWD_SPLIT, EVEN_D=True, PRECISION="tf32",
                                         FOLD=False, TMA=False)),
        (window._window_fwd_kernel, dict(GH=wfh, BQ=wfq, BLOCK_N=window.FWD_BLOCK_N, BLOCK_D=BD,
                                         SPLIT=window.FWD_SPLIT, EVEN_D=True, PRECISION="tf32", FOLD=True,
                                         TMA=True)),
        (window._window_bwd_dq_kernel, dict(GH=wgh, BQ=wbq, BLOCK_N=64, BLOCK_D=BD, SPLIT=window.DQ_SPLIT,
                                            EVEN_D=True, PRECISION="tf32", DOTS=False)),
        (window._window_bwd_dq_kernel, dict(GH=wgh, BQ=wbq, BLOCK_N=64, BLOCK_D=BD, SPLIT=window.DQ_SPLIT,
                                            EVEN_D=True, PRECISION="tf32", DOTS=True)),
        (window._window_bwd_kv_kernel, dict(GH=wkh, BQ=wkq, BLOCK_N=window.KV_BLOCK, BLOCK_D=BD, PRECISION="tf32",
                                            SPLIT=False, EXP2=False, I32=False, ROTATE=0)),
        (window._window_bwd_kv_kernel, dict(GH=wkh, BQ=wkq, BLOCK_N=window.KV_BLOCK, BLOCK_D=BD, PRECISION="tf32",
                                            SPLIT=True, EXP2=True, I32=True, ROTATE=0)),
        (window._window_bwd_kv_kernel, dict(GH=wkh, BQ=wkq, BLOCK_N=window.KV_BLOCK, BLOCK_D=BD, PRECISION="tf32",
                                            SPLIT=True, EXP2=True, I32=True, ROTATE=132)),  # the H200's default
        (span._span_fwd_kernel, dict(k_desc=None, v_desc=None, NUM_SPANS=K, BLOCK_P=span.FWD_BLOCK_P,
                                     BLOCK_N=span.FWD_BLOCK_N, BLOCK_D=sbd, SPLIT=span.FWD_SPLIT, EVEN_D=True,
                                     PRECISION="tf32", FOLD=False, TMA=False)),
        (span._span_fwd_kernel, dict(NUM_SPANS=K, BLOCK_P=span.FWD_BLOCK_P, BLOCK_N=span.FWD_BLOCK_N, BLOCK_D=sbd,
                                     SPLIT=span.FWD_SPLIT, EVEN_D=False, PRECISION="tf32", FOLD=True, TMA=True)),
        (span._span_bwd_dq_kernel, dict(NUM_SPANS=K, BLOCK_P=sbp, BLOCK_N=min(sbn, span.DQ_BLOCK_N), BLOCK_D=sbd,
                                        SPLIT=window.DQ_SPLIT, EVEN_D=True, PRECISION="tf32", DOTS=False,
                                        SEM="relaxed")),
        (span._span_bwd_dq_kernel, dict(NUM_SPANS=K, BLOCK_P=sbp, BLOCK_N=min(sbn, span.DQ_BLOCK_N), BLOCK_D=sbd,
                                        SPLIT=window.DQ_SPLIT, EVEN_D=True, PRECISION="tf32", DOTS=True,
                                        SEM="acq_rel")),
        (span._span_bwd_kv_kernel, dict(NUM_SPANS=K, BLOCK_P=span.KV_TILE, BLOCK_N=window.KV_BLOCK, BLOCK_D=sbd,
                                        PRECISION="tf32", SKIP=True, SORTED=False, EXP2=False, LEAN=False,
                                        EVEN_P=False, EVEN_D=True, INTERIOR=True, NEXT=False)),
        (span._span_bwd_kv_kernel, dict(NUM_SPANS=K, BLOCK_P=span.KV_TILE, BLOCK_N=window.KV_BLOCK, BLOCK_D=sbd,
                                        PRECISION="tf32", SKIP=False, SORTED=True, EXP2=True, LEAN=False,
                                        EVEN_P=False, EVEN_D=True, INTERIOR=True, NEXT=False)),
        (span._span_bwd_kv_kernel, dict(NUM_SPANS=K, BLOCK_P=span.KV_TILE, BLOCK_N=span.KV_BLOCK_N or window.KV_BLOCK,
                                        BLOCK_D=sbd, PRECISION="tf32", SKIP=True, SORTED=True, EXP2=True, LEAN=True,
                                        EVEN_P=True, EVEN_D=True, INTERIOR=True, NEXT=True)),
        (span._span_bwd_kv_kernel, dict(NUM_SPANS=K, BLOCK_P=span.KV_TILE, BLOCK_N=span.KV_BLOCK_N or window.KV_BLOCK,
                                        BLOCK_D=sbd, PRECISION="tf32", SKIP=True, SORTED=True, EXP2=True, LEAN=True,
                                        EVEN_P=False, EVEN_D=False, INTERIOR=False, NEXT=True)),
        (span._pair_key_kernel, dict(BLOCK=1024, WIDE=False)),
        (span._pair_key_kernel, dict(BLOCK=1024, WIDE=True)),
        (merge._gate_kernel, dict(NUM_SPANS=K, BLOCK_R=32, BLOCK_D=BD, RESIDUALS=True)),
        (merge._gate_bwd_kernel, dict(NUM_SPANS=K, KP=common.next_pow2(K), BLOCK_R=16, BLOCK_D=BD, DOTS=False)),
        (merge._gate_bwd_kernel, dict(NUM_SPANS=K, KP=common.next_pow2(K), BLOCK_R=16, BLOCK_D=BD, DOTS=True)),
        (decode._decode_group_kernel, dict(k_desc=None, v_desc=None, NUM_SPANS=K, RB=decode.DECODE_MAX_ROWS,
                                           BLOCK_N=decode.DECODE_BLOCK_N, BLOCK_D=BD, EVEN_D=True, PRECISION="tf32",
                                           PDL=False, TMA=False)),
        (decode._decode_group_kernel, dict(NUM_SPANS=K, RB=decode.DECODE_MAX_ROWS, BLOCK_N=decode.DECODE_BLOCK_N,
                                           BLOCK_D=BD, EVEN_D=True, PRECISION="tf32", PDL=True, TMA=True)),
        (decode._decode_heads_kernel, dict(NUM_SPANS=K, GH=16, BLOCK_N=decode.DECODE_BLOCK_N, BLOCK_D=BD,
                                           EVEN_D=True, PRECISION="tf32", PDL=True)),
        (decode._decode_merge_kernel, dict(NUM_SPANS=K, KP=common.next_pow2(K), BC=64, BLOCK_D=BD, PDL=True)),
    ]
    results = []
    for arch in map(int, sys.argv[1:]):
        for fn, const in KERNELS:
            src = ASTSource(fn=fn, signature=signature(fn, const),
                            constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
            try:
                binary = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                results.append([fn.__name__, arch, len(binary.asm["ptx"]), ""])
            except Exception as exc:  # reported by the test, with the kernel named
                results.append([fn.__name__, arch, 0, f"{type(exc).__name__}: {exc}"[:2000]])
    print(json.dumps(results))
''')


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: really compile, and leave nothing behind
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, "90"], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode != 0 and "No module named 'triton.backends.nvidia'" in proc.stderr:
        pytest.skip("this Triton build has no NVIDIA backend")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [f"{name} (sm_{arch}): {error}" for name, arch, _, error in results if error]
    assert not failed, "\n".join(failed)
    assert len(results) == 30 and all(size > 0 for _, _, size, _ in results)
