/* twostage-linux init: PID 1 of the project's Linux guests (built by `cargo xtask linux`).
 *
 * Exercises memory the way user space does and prints one line per check, all starting with
 * "twostage-linux: ", then "twostage-linux: all checks passed" or "twostage-linux: FAILED: ...".
 * The check lines are deterministic (same seeds, same checksums) for a given CPU count, so a run
 * under a hypervisor can be compared with a run on the bare emulator; the timings go on a line of
 * their own ("times:").
 *
 *   fill      one large malloc'd buffer written with a pattern, checksummed and verified
 *   cow       fork: children and parent write the same inherited buffer, each sees its own data
 *   threads   one pthread per online CPU, pinned to it, each filling its own region
 *   shootdown a page replaced (mmap MAP_FIXED) while threads on other CPUs hold it in their TLBs;
 *             they must read the new page (remote TLB flushes: SBI RFENCE on RISC-V)
 *   churn     mmap/munmap/mprotect of anonymous memory, pages touched, write faults on read-only
 *             pages and read faults on PROT_NONE pages caught as SIGSEGV
 *
 * The checks run in a child of PID 1; PID 1 reports the child's crash, if it crashes, and then
 * powers the machine off: on x86 it first writes a status byte (0 = pass, 1 = fail) to
 * I/O port 0xf4, which the twostage hypervisor watches; everywhere it then calls
 * reboot(RB_POWER_OFF) (SBI SRST on RISC-V). Built static: riscv64-linux-gnu-gcc -static -O2
 * -pthread, or gcc -static -O2 -pthread -DTWOSTAGE_SMALL for Bochs, which is ~100x slower.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <sys/io.h>
#endif

#ifdef TWOSTAGE_SMALL
#define FILL_MIB 4
#define COW_KIB 512
#define THREAD_KIB 512
#define SHOOTDOWN_ROUNDS 16
#define CHURN_ROUNDS 64
#else
#define FILL_MIB 32
#define COW_KIB 4096
#define THREAD_KIB 4096
#define SHOOTDOWN_ROUNDS 200
#define CHURN_ROUNDS 600
#endif
#define MAX_THREADS 64
#define PAGE 4096UL

static char failures[512];
static int failed;

static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("twostage-linux: ", stdout);
	vprintf(fmt, ap);
	fputc('\n', stdout);
	fflush(stdout);
	va_end(ap);
}

/* Records a failed check (its name goes on the final line) and prints why. */
static void fail(const char *check, const char *fmt, ...)
{
	va_list ap;
	char why[256];
	va_start(ap, fmt);
	vsnprintf(why, sizeof why, fmt, ap);
	va_end(ap);
	say("%s: FAILED (%s)", check, why);
	if (!strstr(failures, check)) {
		if (failed)
			strncat(failures, ", ", sizeof failures - strlen(failures) - 1);
		strncat(failures, check, sizeof failures - strlen(failures) - 1);
	}
	failed = 1;
}

static uint64_t now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

/* splitmix64: the value of word `i` of a buffer filled with `seed`. */
static uint64_t pattern(uint64_t seed, uint64_t i)
{
	uint64_t z = seed * 0x9e3779b97f4a7c15ULL + i * 0xbf58476d1ce4e5b9ULL + 1;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void fill(uint64_t *buf, size_t words, uint64_t seed)
{
	for (size_t i = 0; i < words; i++)
		buf[i] = pattern(seed, i);
}

/* Order-sensitive checksum of what the buffer should hold, computed without reading it. */
static uint64_t expected_sum(size_t words, uint64_t seed)
{
	uint64_t s = 0;
	for (size_t i = 0; i < words; i++)
		s = (s << 7 | s >> 57) ^ pattern(seed, i);
	return s;
}

/* Checksums the buffer; *bad gets the index of the first word that differs from the pattern
 * (or `words` if none does). */
static uint64_t verify(const volatile uint64_t *buf, size_t words, uint64_t seed, size_t *bad)
{
	uint64_t s = 0;
	*bad = words;
	for (size_t i = 0; i < words; i++) {
		uint64_t v = buf[i];
		if (v != pattern(seed, i) && *bad == words)
			*bad = i;
		s = (s << 7 | s >> 57) ^ v;
	}
	return s;
}

static void check_fill(void)
{
	size_t words = (size_t)FILL_MIB << 20 >> 3, bad;
	uint64_t *buf = malloc(words * 8);
	if (!buf) {
		fail("fill", "malloc of %d MiB failed", FILL_MIB);
		return;
	}
	fill(buf, words, 1);
	uint64_t want = expected_sum(words, 1), got = verify(buf, words, 1, &bad);
	if (bad != words || got != want)
		fail("fill", "word %zu of %d MiB differs, checksum %#llx, expected %#llx", bad, FILL_MIB,
		     (unsigned long long)got, (unsigned long long)want);
	else
		say("fill: ok (%d MiB, checksum %#llx)", FILL_MIB, (unsigned long long)got);
	free(buf);
}

static int read_byte(int fd)
{
	char c;
	return read(fd, &c, 1) == 1 ? c : -1;
}

static void write_bytes(int fd, int n)
{
	while (n-- > 0)
		if (write(fd, "x", 1) != 1)
			return;
}

/* Parent fills a buffer with seed 100 and forks `kids` children. Each child writes seed 101+k,
 * reports, waits until the parent has overwritten its own copy, and verifies again. The parent
 * verifies its copy is untouched after every child wrote, then writes seed 200. */
static void check_cow(int kids)
{
	size_t words = (size_t)COW_KIB << 10 >> 3, bad;
	uint64_t *buf = malloc(words * 8);
	int done[2], go[2];
	pid_t pids[MAX_THREADS];
	if (!buf || pipe(done) || pipe(go)) {
		fail("cow", "malloc or pipe failed");
		return;
	}
	fill(buf, words, 100);
	fflush(stdout);
	for (int k = 0; k < kids; k++) {
		pids[k] = fork();
		if (pids[k] < 0) {
			fail("cow", "fork: %s", strerror(errno));
			kids = k;
			break;
		}
		if (pids[k] == 0) {
			uint64_t seed = 101 + k;
			fill(buf, words, seed);
			verify(buf, words, seed, &bad);
			int ok = bad == words;
			write_bytes(done[1], 1);
			read_byte(go[0]);
			verify(buf, words, seed, &bad);
			_exit(ok && bad == words ? 0 : 1);
		}
	}
	for (int k = 0; k < kids; k++)
		read_byte(done[0]);
	verify(buf, words, 100, &bad);
	if (bad != words)
		fail("cow", "parent's copy changed at word %zu after the children wrote theirs", bad);
	fill(buf, words, 200);
	write_bytes(go[1], kids);
	int bad_kids = 0;
	for (int k = 0; k < kids; k++) {
		int status;
		if (waitpid(pids[k], &status, 0) != pids[k] || !WIFEXITED(status) || WEXITSTATUS(status))
			bad_kids++;
	}
	if (bad_kids)
		fail("cow", "%d of %d children saw the wrong data", bad_kids, kids);
	verify(buf, words, 200, &bad);
	if (bad != words)
		fail("cow", "parent's second write lost at word %zu", bad);
	if (!failed || !strstr(failures, "cow"))
		say("cow: ok (%d children, %d KiB each)", kids, COW_KIB);
	close(done[0]), close(done[1]), close(go[0]), close(go[1]);
	free(buf);
}

static int pin(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof set, &set);
}

struct worker {
	pthread_t thread;
	int cpu, ran_on;
	uint64_t sum;
	int ok;
};

static void *fill_worker(void *arg)
{
	struct worker *w = arg;
	size_t words = (size_t)THREAD_KIB << 10 >> 3;
	w->ran_on = pin(w->cpu) ? -1 : sched_getcpu();
	uint64_t *buf = malloc(words * 8);
	size_t bad;
	if (!buf)
		return NULL;
	fill(buf, words, 300 + w->cpu);
	w->sum = verify(buf, words, 300 + w->cpu, &bad);
	w->ok = bad == words;
	free(buf);
	return NULL;
}

static void check_threads(int cpus)
{
	struct worker w[MAX_THREADS];
	size_t words = (size_t)THREAD_KIB << 10 >> 3;
	uint64_t total = 0;
	int on_own_cpu = 0, ok = 1;
	for (int i = 0; i < cpus; i++) {
		w[i] = (struct worker){ .cpu = i, .ran_on = -1 };
		if (pthread_create(&w[i].thread, NULL, fill_worker, &w[i])) {
			fail("threads", "pthread_create %d failed", i);
			cpus = i;
			break;
		}
	}
	for (int i = 0; i < cpus; i++) {
		pthread_join(w[i].thread, NULL);
		on_own_cpu += w[i].ran_on == i;
		if (!w[i].ok || w[i].sum != expected_sum(words, 300 + i)) {
			fail("threads", "thread %d: wrong data, checksum %#llx", i, (unsigned long long)w[i].sum);
			ok = 0;
		}
		total ^= w[i].sum;
	}
	if (on_own_cpu != cpus) {
		fail("threads", "only %d of %d threads ran on the CPU they were pinned to", on_own_cpu, cpus);
		ok = 0;
	}
	if (ok)
		say("threads: ok (%d threads on %d CPUs, %d KiB each, joined checksum %#llx)", cpus, on_own_cpu,
		    THREAD_KIB, (unsigned long long)total);
}

static pthread_barrier_t barrier;
static volatile uint64_t *shared_page;
static int stale_reads;
static pthread_mutex_t stale_lock = PTHREAD_MUTEX_INITIALIZER;

struct reader {
	pthread_t thread;
	int cpu;
};

static void *shootdown_reader(void *arg)
{
	struct reader *r = arg;
	pin(r->cpu);
	for (int round = 0; round < SHOOTDOWN_ROUNDS; round++) {
		pthread_barrier_wait(&barrier); /* the main thread has mapped and written the page */
		uint64_t v = *shared_page;
		if (v != pattern(400, round)) {
			pthread_mutex_lock(&stale_lock);
			stale_reads++;
			pthread_mutex_unlock(&stale_lock);
		}
		pthread_barrier_wait(&barrier); /* everyone has read it */
	}
	return NULL;
}

/* The main thread (on CPU 0) replaces the page at a fixed address with a new one every round;
 * readers on every CPU have the old translation cached, so the kernel must flush their TLBs. */
static void check_shootdown(int cpus)
{
	struct reader r[MAX_THREADS];
	int readers = cpus;
	void *at = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (at == MAP_FAILED) {
		fail("shootdown", "mmap: %s", strerror(errno));
		return;
	}
	shared_page = at;
	pin(0);
	pthread_barrier_init(&barrier, NULL, readers + 1);
	for (int i = 0; i < readers; i++) {
		r[i].cpu = i;
		if (pthread_create(&r[i].thread, NULL, shootdown_reader, &r[i])) {
			/* The barrier count is wrong now: nothing sensible left to do. */
			fail("shootdown", "pthread_create failed");
			say("FAILED: %s", failures);
			_exit(1);
		}
	}
	int map_errors = 0;
	for (int round = 0; round < SHOOTDOWN_ROUNDS; round++) {
		if (round > 0 && mmap(at, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
				      -1, 0) != at)
			map_errors++;
		*shared_page = pattern(400, round);
		pthread_barrier_wait(&barrier);
		pthread_barrier_wait(&barrier);
	}
	for (int i = 0; i < readers; i++)
		pthread_join(r[i].thread, NULL);
	pthread_barrier_destroy(&barrier);
	munmap(at, PAGE);
	cpu_set_t all;
	CPU_ZERO(&all);
	for (int i = 0; i < cpus; i++)
		CPU_SET(i, &all);
	sched_setaffinity(0, sizeof all, &all);
	if (stale_reads || map_errors)
		fail("shootdown", "%d stale reads, %d failed remaps in %d rounds", stale_reads, map_errors,
		     SHOOTDOWN_ROUNDS);
	else
		say("shootdown: ok (%d rounds, %d readers)", SHOOTDOWN_ROUNDS, readers);
}

static sigjmp_buf fault_jump;
static volatile void *fault_addr;

static void on_segv(int sig, siginfo_t *info, void *ctx)
{
	(void)sig, (void)ctx;
	fault_addr = info->si_addr;
	siglongjmp(fault_jump, 1);
}

/* Whether touching `p` (writing if `write`) raises SIGSEGV at `p`. */
static int faults(volatile uint64_t *p, int write)
{
	fault_addr = NULL;
	if (sigsetjmp(fault_jump, 1) == 0) {
		if (write)
			*p = 1;
		else
			(void)*p;
		return 0;
	}
	return fault_addr == (void *)p;
}

struct live {
	uint64_t *p;
	size_t pages;
	uint64_t seed;
};

static int check_pages(const struct live *m)
{
	for (size_t i = 0; i < m->pages; i++)
		if (m->p[i * PAGE / 8] != pattern(m->seed, i) || m->p[i * PAGE / 8 + 511] != ~pattern(m->seed, i))
			return 0;
	return 1;
}

static void touch_pages(const struct live *m)
{
	for (size_t i = 0; i < m->pages; i++) {
		m->p[i * PAGE / 8] = pattern(m->seed, i);
		m->p[i * PAGE / 8 + 511] = ~pattern(m->seed, i);
	}
}

/* Keeps up to 16 mappings alive; each round replaces one: the old one is checked, made
 * read-only and checked again (and a write must fault), split by munmap'ing its upper half,
 * the lower half made PROT_NONE (a read must fault), then unmapped. */
static void check_churn(void)
{
	struct live slots[16] = { 0 };
	struct sigaction sa = { .sa_sigaction = on_segv, .sa_flags = SA_SIGINFO | SA_NODEFER };
	uint64_t rng = 12345;
	int errors = 0, expected_faults = 0, seen_faults = 0, maps = 0;
	sigaction(SIGSEGV, &sa, NULL);
	for (int round = 0; round < CHURN_ROUNDS + 16; round++) {
		struct live *m = &slots[round % 16];
		if (m->p) {
			if (!check_pages(m))
				errors++;
			if (mprotect(m->p, m->pages * PAGE, PROT_READ))
				errors++;
			if (!check_pages(m))
				errors++;
			if (round % 4 == 0) {
				expected_faults++;
				seen_faults += faults(m->p + (m->pages - 1) * PAGE / 8, 1);
			}
			size_t low = (m->pages + 1) / 2;
			if (m->pages > 1 && munmap((char *)m->p + low * PAGE, (m->pages - low) * PAGE))
				errors++;
			if (mprotect(m->p, low * PAGE, PROT_NONE))
				errors++;
			if (round % 4 == 2) {
				expected_faults++;
				seen_faults += faults(m->p, 0);
			}
			if (munmap(m->p, low * PAGE))
				errors++;
			m->p = NULL;
		}
		if (round >= CHURN_ROUNDS)
			continue;
		rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
		m->pages = 1 + (rng >> 33) % 64;
		m->seed = 500 + round;
		void *p = mmap(NULL, m->pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) {
			errors++;
			continue;
		}
		m->p = p;
		maps++;
		touch_pages(m);
	}
	signal(SIGSEGV, SIG_DFL);
	if (errors || seen_faults != expected_faults)
		fail("churn", "%d errors, %d of %d expected SIGSEGVs", errors, seen_faults, expected_faults);
	else
		say("churn: ok (%d mappings, %d SIGSEGVs as expected)", maps, seen_faults);
}

static void power_off(void)
{
	fflush(stdout);
	tcdrain(STDOUT_FILENO);
#if defined(__x86_64__)
	/* The twostage x86 hypervisor ends the run with the byte written to port 0xf4. */
	if (ioperm(0xf4, 1, 1) == 0)
		outb(failed ? 1 : 0, 0xf4);
#endif
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

/* The checks, in a child of PID 1: the kernel treats init specially (it logs every SIGSEGV
 * init takes, handled or not, and panics if init dies), and a crash here should be a line. */
static int run_checks(void)
{
	uint64_t t0 = now_ms(), t[5];
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	if (cpus < 1 || cpus > MAX_THREADS)
		cpus = cpus < 1 ? 1 : MAX_THREADS;
	say("start (%ld CPUs online, page size %ld)", cpus, sysconf(_SC_PAGESIZE));
	check_fill();
	t[0] = now_ms();
	check_cow(cpus < 2 ? 2 : (int)cpus);
	t[1] = now_ms();
	check_threads((int)cpus);
	t[2] = now_ms();
	check_shootdown((int)cpus);
	t[3] = now_ms();
	check_churn();
	t[4] = now_ms();
	say("times: fill %llu ms, cow %llu ms, threads %llu ms, shootdown %llu ms, churn %llu ms",
	    (unsigned long long)(t[0] - t0), (unsigned long long)(t[1] - t[0]), (unsigned long long)(t[2] - t[1]),
	    (unsigned long long)(t[3] - t[2]), (unsigned long long)(t[4] - t[3]));
	if (failed)
		say("FAILED: %s", failures);
	else
		say("all checks passed");
	return failed;
}

int main(void)
{
	if (getpid() != 1)
		return run_checks();
	if (mount("proc", "/proc", "proc", 0, NULL))
		say("mounting /proc failed: %s", strerror(errno));
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0)
		_exit(run_checks());
	int status;
	if (pid < 0) {
		fail("init", "fork: %s", strerror(errno));
	} else if (waitpid(pid, &status, 0) != pid) {
		fail("init", "waitpid: %s", strerror(errno));
	} else if (!WIFEXITED(status)) {
		fail("init", "the checks died of signal %d", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
	} else if (WEXITSTATUS(status)) {
		failed = 1; /* the child printed its FAILED line (it prints one before any non-zero exit) */
		power_off();
	}
	if (failed)
		say("FAILED: %s", failures);
	power_off();
}
