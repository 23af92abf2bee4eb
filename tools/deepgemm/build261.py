"""Build DeepGEMM 2.6.1's C++ module with the anchors' build script, optionally with libstdc++ first among the
module's needed libraries.

    python tools/deepgemm/build261.py ANCHORS DEEPGEMM_DIR [--libstdcxx-first]

Why --libstdcxx-first: torch's wheels carry statically linked copies of parts of libstdc++ (std::filesystem,
some std::string members, std::regex data, exception_ptr refcounting) and export them. libstdc++ is not in the
process's global symbol scope (torch loads libtorch_global_deps RTLD_GLOBAL, which does not need it), so a torch
extension's references bind to the first provider in its own dependency order: libc10 / libtorch / libtorch_cpu,
listed before libstdc++ (which g++ appends last). LD_DEBUG=bindings shows deep_gemm._C's std::filesystem calls
(create_directories, directory_iterator, rename, remove, path::_M_split_cmpts ...) going to libtorch_cpu.so. That is
harmless while the extension's compiler and torch's agree on those classes' inline parts; linking libstdc++ first
makes the extension use the system's libstdc++ for them instead. Other build flags: the anchors' (ANCHORS_DG_CXX_STD,
DG_JIT_USE_RUNTIME_API are read from the environment by the anchors' tools/build_deepgemm.py).
"""
import os
import sys


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("anchors")
    ap.add_argument("deepgemm_dir")
    ap.add_argument("--libstdcxx-first", action="store_true")
    args = ap.parse_args(argv[1:])
    tools = os.path.join(os.path.abspath(args.anchors), "tools")
    sys.path.insert(0, tools)
    import build_deepgemm
    import extbuild

    if args.libstdcxx_first:
        plain = extbuild.build_extension

        def with_libstdcxx_first(*args, libraries=(), **kwargs):
            return plain(*args, libraries=["stdc++", *libraries], **kwargs)

        extbuild.build_extension = with_libstdcxx_first  # build_deepgemm imports it from extbuild at call time
        print("build261: libstdc++ linked first")
    return build_deepgemm.main([os.path.join(tools, "build_deepgemm.py"), args.deepgemm_dir])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
