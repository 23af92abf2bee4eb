/* LD_PRELOAD helper: on SIGSEGV/SIGBUS/SIGILL/SIGFPE/SIGABRT print the faulting address and a native backtrace
 * (glibc backtrace_symbols_fd: "object(symbol+off) [addr]" lines) to stderr, then re-raise with the default action.
 * Python's faulthandler (python -X faulthandler) saves this handler as the previous one, dumps the Python stack
 * first and then chains here, so one crash prints both stacks.  Frames of an object without dynamic symbols read
 * "object(+0xOFF)": `addr2line -Cfie object 0xOFF` names the function when the object has debug info.
 *   gcc -shared -fPIC -O1 -o segv_bt.so segv_bt.c      (tools/gpu/gemm.sh builds it on the device)
 */
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void put(const char *s) { ssize_t r = write(2, s, strlen(s)); (void)r; }

static void on_fault(int sig, siginfo_t *info, void *ctx) {
    (void)ctx;
    char line[128];
    snprintf(line, sizeof line, "\n[segv_bt] signal %d (%s) at address %p; native backtrace:\n", sig,
             strsignal(sig), info ? info->si_addr : NULL);
    put(line);
    void *frames[64];
    int n = backtrace(frames, 64);
    backtrace_symbols_fd(frames, n, 2);
    put("[segv_bt] end of native backtrace\n");
    signal(sig, SIG_DFL);
    raise(sig);
}

__attribute__((constructor)) static void install(void) {
    static char stack[1 << 16];
    stack_t ss = {.ss_sp = stack, .ss_size = sizeof stack, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    int sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
    for (unsigned i = 0; i < sizeof sigs / sizeof sigs[0]; i++) sigaction(sigs[i], &sa, NULL);
}
