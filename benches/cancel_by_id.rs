//! Cost of cancelling a request by id (`Rdbss::cancel_by_id`, what RDBSS's IRP cancel routine
//! does), memory per in-flight context, and create + complete + free throughput.
//!
//! # What is measured
//!
//! Eight criterion benchmarks in one group (`cancel_by_id`), plus one measurement outside
//! criterion:
//!
//! | benchmark | one iteration |
//! |---|---|
//! | `in_flight_16` | `rdbss.cancel_by_id(id)` on one of 16 contexts in flight |
//! | `in_flight_10000` | the same with 10 000 contexts in flight |
//! | `in_flight_1000000` | the same with 1 000 000 contexts in flight |
//! | `memory_floor_16` | no rdbss code: the same memory accesses as one cancel, on one of 16 plain 80-byte nodes (see below) |
//! | `memory_floor_10000` | the same with 10 000 nodes |
//! | `memory_floor_1000000` | the same with 1 000 000 nodes |
//! | `create_complete_1_thread` | `rdbss.create_context(..)` then `ContextRef::complete_request(..)`, which drops the only reference and so unlinks and frees the context, on one thread |
//! | `create_complete_2_threads` | the same loop on two threads at once against one instance; one iteration is one create + complete + free, whichever thread did it |
//! | memory (not criterion) | live heap bytes per in-flight context, from a counting global allocator |
//!
//! ## `cancel_by_id`: the honest repeatable operation
//!
//! A cancel is one-shot: a second `cancel_by_id` of the same context only finds `CANCELLED` and
//! returns `AlreadyCancelled`, a cheaper path than the real one. So every timed call cancels a
//! context that is **uncancelled, pending, and has a cancel routine armed**, and the call does all
//! of the real work: the id's slot is found in the table, the context is referenced (CAS on its
//! count) and checked against the id's serial number, its spin lock is taken, `CANCELLED` is set,
//! the routine is taken out and called (a plain `fn(&RxContext<()>) -> NtStatus` returning
//! `STATUS_SUCCESS`), and the reference is dropped. Every outcome is checked to be
//! `Cancelled(RoutineCalled(STATUS_SUCCESS))`.
//!
//! The population of N contexts is created once per benchmark (one `Rdbss` instance each, each
//! context armed) and held in a `Vec<ContextRef<()>>`. A random permutation of the whole population
//! (xorshift, fixed seed) gives the order in which contexts are cancelled, so with 1 000 000 in
//! flight consecutive cancels land on unrelated slots and nodes all over the table (about 100 MB of
//! nodes plus 8 MB of slots: that is what an O(1) claim has to survive); a new permutation is drawn
//! whenever one is used up (for N = 16, every batch). `criterion`'s `iter_custom` runs the calls in
//! batches of [`BATCH`] = 16:
//!
//! 1. untimed: the next 16 positions of the permutation are taken and their ids copied into a
//!    small local array (the caller of `cancel_by_id` already has the id in hand; copying it here
//!    does not touch the context or the registry, so it warms neither);
//! 2. **timed**: `cancel_by_id(id)` for the 16 ids, between two `Instant::now()` calls;
//! 3. untimed: each of the 16 cancelled contexts is made fresh again with
//!    `ContextRef::reinitialize` (`RxReinitializeContext`: new serial number, so a new id, and
//!    `CANCELLED` cleared; possible because the `Vec` holds the only reference) and re-armed.
//!
//! Reinitialising instead of freeing and re-creating keeps the population's nodes and slots where
//! they are (so the table stays exactly N in flight and the access pattern stays random) and keeps
//! memory reclamation out of the timed part. The batch size is the same for every N, so every
//! figure carries the same timer overhead: the clock reads around each batch (about 40 ns per
//! batch on a KVM guest with a TSC clock, so about 2.5 ns per call, ~3% of the 16-in-flight
//! figure), which pulls the ratio slightly towards 1. A batch's contexts were last touched one full permutation earlier, so for
//! N = 1 000 000 they are as cold as the cache hierarchy makes them; for N = 16 everything is in L1.
//!
//! The target is `in_flight_1000000 / in_flight_16 <= 2.0`: finding a context by id is O(1) not
//! just in operation count but in cost, cache misses included.
//!
//! ## `memory_floor`: what the hardware alone charges for the same accesses
//!
//! With 1 000 000 in flight, a cancel's cost is dominated by misses that cannot overlap: the id
//! leads to an 8-byte slot in the table, the slot's pointer to the heap node (80 bytes, a 96-byte
//! malloc chunk, so two cache lines), and on the node come a compare-exchange on the reference
//! count, the spin lock's acquire and release and an atomic or on the flags, which lie on the
//! node's second line. The `memory_floor_N` benchmarks make exactly that access pattern with no
//! rdbss code, to show how much of the 1M / 16 ratio the memory hierarchy imposes on any design
//! with one table slot and one heap node per context:
//!
//! * the population is N individually boxed `Node`s (`[AtomicU64; 10]`, 80 bytes, the size of
//!   `RxContext<()>`, so the same malloc size class), allocated one by one as the registry allocates
//!   its nodes, and held in a `Vec<Box<Node>>`, which is the table: one 8-byte pointer per node;
//! * the order is the same kind of permutation (the same xorshift generator and seed for the same
//!   N), redrawn whenever it is used up, and the batching is the same: [`BATCH`] = 16 positions
//!   copied out untimed, then, timed between two `Instant::now()` calls, for each position: load
//!   the table entry, then on the node a load and compare-exchange of word 0 (taking a reference,
//!   as `try_reference` does), a compare-exchange of word 1 from 0 to 1 (spin lock acquire), a
//!   `fetch_or` on word 8 (byte 64, always the node's other cache line: the `CANCELLED` flag, set
//!   under the lock), and a store of 0 to word 1 (release);
//! * the accesses are repeatable as they stand (the count grows, the lock is free again, the or is
//!   idempotent), so there is no untimed reset step; nothing untimed touches the nodes or the table
//!   entries, so a batch's nodes are as cold as in `cancel_by_id`.
//!
//! What the floor leaves out is everything that is not those accesses: the epoch pin, the serial
//! number check, the routine call, the reference drop, the outcome. Those are mostly hits on lines
//! the accesses above have just brought in, so they add roughly the same nanoseconds at every N and
//! pull `cancel_by_id`'s ratio towards 1 compared with the floor's. The floor's own ratio
//! (`memory_floor_1000000 / memory_floor_16`) is what the hardware charges for going from L1 to
//! DRAM on this pattern, and `cancel_by_id ratio / floor ratio` how far `cancel_by_id` is from it.
//! Neither has a target: the floor is reported so that the `cancel_by_id` ratio can be read against
//! it; the `cancel_by_id` target above is unchanged.
//!
//! The floor is a lower bound, not the cost of fully serialized misses. Its operations are
//! independent (the next position comes from the permutation, not from the previous node) and its
//! loop body is about fifteen instructions, so the out-of-order core can start the table and node
//! misses of the next operations while the current one waits; a real cancel runs hundreds of
//! instructions between two nodes, which leaves the core no such reach ahead. A variant that made
//! each position depend on the previous `fetch_or`'s result (tried while writing this benchmark,
//! not kept) cost about the same as the floor at N = 16 and four to five times as much at
//! 1 000 000. So a `cancel_by_id` figure well above the floor at 1 000 000 does not by itself
//! prove extra misses: the same misses, taken one after the other, account for much of it.
//!
//! ## Memory per in-flight context
//!
//! This binary installs a counting `#[global_allocator]` around `std::alloc::System`. Counting is
//! switched on only for the measurement (one relaxed load of a flag otherwise, so the timed
//! benchmarks are not slowed by it and the two-thread benchmark shares no counter). Before any
//! criterion benchmark runs, the live-byte delta is taken around creating (and arming) 1 000 000
//! contexts that stay in flight, and divided by 1 000 000. That includes the registry's share (its
//! slot table, which grows in buckets of doubling size) but not the caller's `ContextRef` handles:
//! the `Vec` holding them is allocated before counting starts. Fixed per-instance costs (the
//! instance, its epoch registration, the first 32-slot bucket) are paid before counting starts by a
//! warm-up create + complete. The same is then done at 524 257 contexts, one past a bucket
//! boundary, where the slot table is at its emptiest (worst case for the table's share).
//!
//! A counting allocator sees requested sizes, not malloc's own per-allocation overhead (chunk
//! header and rounding); the output adds an estimate of 16 bytes per allocation, and a resident-set
//! (`VmRSS`) delta as a cross-check that includes it (Linux only; the handles' `Vec` pages, touched
//! during the window, are subtracted). The target is `<= 256` bytes per context.
//!
//! ## Summary
//!
//! After the benchmarks the medians are read back from the `estimates.json` files criterion wrote
//! in this run (see `benches/common/mod.rs`, shared with the `cancel_routine` benchmark), and a
//! summary prints the three `cancel_by_id` medians, the 1M / 16 ratio with PASS or MISS, the three
//! `memory_floor` medians with the floor's own 1M / 16 ratio and `cancel_by_id`'s ratio divided by
//! it (both reported, no target), bytes per context with PASS or MISS, and create + complete +
//! free operations per second for one and two threads. A miss is reported, never a panic. Without fresh estimates (criterion's `--test` mode,
//! `--list`, `--profile-time`, a filter, `--discard-baseline`, ...) the ratios are reported as
//! unavailable; the memory figures do not depend on criterion and are printed anyway (except with
//! `--list`).
//!
//! # Running
//!
//! ```text
//! cargo bench --bench cancel_by_id                          # full run (a few minutes)
//! cargo bench --bench cancel_by_id -- --test                # run each benchmark once (seconds)
//! cargo bench --bench cancel_by_id -- in_flight             # only the cancel_by_id benchmarks
//! cargo bench --bench cancel_by_id -- 'in_flight|memory_floor' # those and the memory floor
//! ```
//!
//! Populations are created lazily, inside the benchmark, so a filtered-out benchmark costs no
//! setup; the memory measurement always runs (about a second). The machine should be otherwise
//! idle: with two cores, the two-thread benchmark competes with any other load.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::mem::size_of;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use common::{Median, Snapshot};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use rdbss::{
    CancelByIdOutcome, CancelOutcome, ContextInit, ContextRef, MajorFunction, ManualWorkQueue,
    NtStatus, Rdbss, RequestId, RxContext,
};

// ---------------------------------------------------------------------------------------------
// Counting allocator
// ---------------------------------------------------------------------------------------------

/// `System`, counting live bytes and allocations while [`COUNTING`] is on.
struct CountingAllocator;

/// Whether allocations are counted. Off except around the memory measurement.
static COUNTING: AtomicBool = AtomicBool::new(false);
/// Bytes allocated minus bytes freed while counting.
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
/// Allocations minus deallocations while counting.
static LIVE_ALLOCATIONS: AtomicIsize = AtomicIsize::new(0);

#[inline]
fn count(bytes: isize, allocations: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed);
        LIVE_ALLOCATIONS.fetch_add(allocations, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees hold; the counting touches only atomics and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize, 1);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize, 1);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block this allocator (that is, `System`) returned, with its
        // layout.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, plus `realloc`'s size rules, which the caller upholds.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(new_size as isize - layout.size() as isize, 0);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

/// The criterion group all eight benchmarks belong to (also their directory under the home).
const GROUP: &str = "cancel_by_id";
const IN_FLIGHT_16: &str = "in_flight_16";
const IN_FLIGHT_10K: &str = "in_flight_10000";
const IN_FLIGHT_1M: &str = "in_flight_1000000";
const FLOOR_16: &str = "memory_floor_16";
const FLOOR_10K: &str = "memory_floor_10000";
const FLOOR_1M: &str = "memory_floor_1000000";
const CREATE_COMPLETE_1: &str = "create_complete_1_thread";
const CREATE_COMPLETE_2: &str = "create_complete_2_threads";
const BENCHMARKS: [&str; 8] = [
    IN_FLIGHT_16,
    IN_FLIGHT_10K,
    IN_FLIGHT_1M,
    FLOOR_16,
    FLOOR_10K,
    FLOOR_1M,
    CREATE_COMPLETE_1,
    CREATE_COMPLETE_2,
];

/// The `cancel_by_id` populations, with their benchmark names.
const POPULATIONS: [(&str, usize); 3] = [
    (IN_FLIGHT_16, 16),
    (IN_FLIGHT_10K, 10_000),
    (IN_FLIGHT_1M, 1_000_000),
];

/// The `memory_floor` populations, with their benchmark names (the same sizes).
const FLOOR_POPULATIONS: [(&str, usize); 3] =
    [(FLOOR_16, 16), (FLOOR_10K, 10_000), (FLOOR_1M, 1_000_000)];

/// `cancel_by_id` calls per timed batch (the smallest population, so the same for every N).
const BATCH: usize = 16;

/// Target for `in_flight_1000000 / in_flight_16`.
const RATIO_TARGET: f64 = 2.0;
/// Target for heap bytes per in-flight context.
const BYTES_TARGET: f64 = 256.0;
/// The estimate of malloc's own overhead per allocation, invisible to a counting allocator.
const MALLOC_OVERHEAD: f64 = 16.0;
/// Contexts held for the memory measurement, and a second count one past a bucket boundary of the
/// slot table (`32 * (2^14 - 1) + 1`: the table has just doubled to `32 * (2^15 - 1)` slots).
const MEMORY_COUNTS: [usize; 2] = [1_000_000, 32 * ((1 << 14) - 1) + 1];

/// The armed routine: what a mini-redirector's abort-the-exchange routine would be.
fn abort_exchange(_: &RxContext<()>) -> NtStatus {
    NtStatus::SUCCESS
}

fn read_init() -> ContextInit {
    ContextInit {
        major_function: MajorFunction::READ,
        ..ContextInit::default()
    }
}

/// An instance whose (never used here: everything runs at PASSIVE_LEVEL) DISPATCH-level work
/// queue is a manual one, so it starts no worker thread.
fn new_instance() -> Rdbss<()> {
    Rdbss::with_work_queue(ManualWorkQueue::new())
}

/// A new context, armed.
fn create_armed(rdbss: &Rdbss<()>) -> ContextRef<()> {
    let ctx = rdbss
        .create_context(read_init(), ())
        .unwrap_or_else(|(status, ())| panic!("create_context failed: {status:?}"));
    ctx.set_minirdr_cancel_routine(Some(abort_exchange))
        .expect("arming a fresh context");
    ctx
}

/// xorshift64*: a small, fast, seeded generator (the order only needs to be unpredictable to the
/// hardware prefetchers, not to anyone else).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fisher-Yates.
    fn shuffle(&mut self, items: &mut [u32]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// A random permutation of `0..n` (xorshift, seed fixed by `n`), handed out [`BATCH`] positions
/// at a time and redrawn whenever it is used up.
struct Permutation {
    order: Vec<u32>,
    /// How much of `order` is used up.
    next: usize,
    rng: XorShift,
}

impl Permutation {
    fn new(n: usize) -> Permutation {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ n as u64);
        let mut order: Vec<u32> = (0..n as u32).collect();
        rng.shuffle(&mut order);
        Permutation {
            order,
            next: 0,
            rng,
        }
    }

    /// The next positions: [`BATCH`] of them, or fewer at the end of `left` iterations or of the
    /// population (so with N = 16 every batch is a whole new permutation).
    fn next_batch(&mut self, left: u64) -> &[u32] {
        if self.next == self.order.len() {
            self.rng.shuffle(&mut self.order);
            self.next = 0;
        }
        let k = BATCH
            .min(self.order.len() - self.next)
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        let positions = &self.order[self.next..self.next + k];
        self.next += k;
        positions
    }
}

// ---------------------------------------------------------------------------------------------
// cancel_by_id
// ---------------------------------------------------------------------------------------------

/// N armed contexts in flight in one instance, and the random order in which they are cancelled.
struct Population {
    rdbss: Rdbss<()>,
    /// The only reference to each context.
    contexts: Vec<ContextRef<()>>,
    /// `contexts[i].id()`, kept apart so that picking an id does not touch the context.
    ids: Vec<RequestId>,
    /// The order in which positions in `contexts` are cancelled.
    order: Permutation,
}

impl Population {
    fn new(n: usize) -> Population {
        let rdbss = new_instance();
        let contexts: Vec<ContextRef<()>> = (0..n).map(|_| create_armed(&rdbss)).collect();
        let ids = contexts.iter().map(|c| c.id()).collect();
        Population {
            rdbss,
            contexts,
            ids,
            order: Permutation::new(n),
        }
    }

    /// Cancels `iters` fresh contexts by id, [`BATCH`] at a time, and returns the time spent in the
    /// `cancel_by_id` calls only (see the module documentation).
    fn cancel_by_id(&mut self, iters: u64) -> Duration {
        const EXPECTED: Result<CancelByIdOutcome, NtStatus> = Ok(CancelByIdOutcome::Cancelled(
            CancelOutcome::RoutineCalled(NtStatus::SUCCESS),
        ));
        let mut timed = Duration::ZERO;
        let mut left = iters;
        let mut batch = [(0_u32, RequestId::from_u64(0)); BATCH];
        while left > 0 {
            // 1. Untimed: which contexts, and their ids.
            let positions = self.order.next_batch(left);
            let k = positions.len();
            for (slot, &position) in batch.iter_mut().zip(positions) {
                *slot = (position, self.ids[position as usize]);
            }
            // 2. Timed: the cancels.
            let rdbss = black_box(&self.rdbss);
            let mut all_ok = true;
            let start = Instant::now();
            for &(_, id) in &batch[..k] {
                all_ok &= rdbss.cancel_by_id(black_box(id)) == EXPECTED;
            }
            timed += start.elapsed();
            assert!(all_ok, "a cancel_by_id did not call the armed routine");
            // 3. Untimed: make the cancelled contexts fresh and armed again, under new ids.
            for &(position, _) in &batch[..k] {
                let ctx = &mut self.contexts[position as usize];
                let id = ctx
                    .reinitialize()
                    .expect("the population holds the only reference");
                ctx.set_minirdr_cancel_routine(Some(abort_exchange))
                    .expect("re-arming a reinitialised context");
                self.ids[position as usize] = id;
            }
            left -= k as u64;
        }
        timed
    }

    /// Checks that the population is intact: N in flight, all armed, none cancelled.
    fn check(&self) {
        assert_eq!(self.rdbss.active_contexts(), self.contexts.len());
        for (ctx, id) in self.contexts.iter().zip(&self.ids) {
            assert!(ctx.id() == *id && !ctx.is_cancelled() && !ctx.is_completed());
            assert!(ctx.has_cancel_routine());
        }
    }
}

fn bench_cancel_by_id(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, n: usize) {
    // Created on first use, so a benchmark that the filter skips costs nothing.
    let mut population: Option<Population> = None;
    group.bench_function(name, |b| {
        let population = population.get_or_insert_with(|| Population::new(n));
        b.iter_custom(|iters| population.cancel_by_id(iters));
    });
    if let Some(population) = population {
        population.check();
    }
}

// ---------------------------------------------------------------------------------------------
// memory floor
// ---------------------------------------------------------------------------------------------

/// A stand-in for a context node: 80 bytes like `RxContext<()>`, so malloc puts it in the same
/// 96-byte chunk size class; word [`REFS`] and [`LOCK`] on its first cache line, [`FLAGS`] at byte
/// 64, so always on the next one.
#[derive(Default)]
struct Node([AtomicU64; 10]);

const _: () = assert!(size_of::<Node>() == 80);

/// The reference count's word.
const REFS: usize = 0;
/// The spin lock's word.
const LOCK: usize = 1;
/// The flags' word, on the node's second cache line.
const FLAGS: usize = 8;
/// The bit set in [`FLAGS`], as `CANCELLED` is.
const CANCELLED_BIT: u64 = 1;

/// The memory accesses of one cancel on `node`: take a reference (load + compare-exchange, as
/// `try_reference`), take the spin lock (compare-exchange 0 -> 1), set the flag (`fetch_or`, under
/// the lock as in `claim_cancel`), release the lock (store 0). The orderings are the crate's.
/// Returns whether the reference and the lock were taken (both always are: one thread).
#[inline(always)]
fn touch(node: &Node) -> bool {
    let refs = &node.0[REFS];
    let count = refs.load(Ordering::Relaxed);
    let referenced = refs
        .compare_exchange(count, count + 1, Ordering::Acquire, Ordering::Relaxed)
        .is_ok();
    let lock = &node.0[LOCK];
    let locked = lock
        .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_ok();
    node.0[FLAGS].fetch_or(CANCELLED_BIT, Ordering::AcqRel);
    lock.store(0, Ordering::Release);
    referenced & locked
}

/// N boxed nodes and the random order in which they are touched, with no rdbss code.
struct Floor {
    /// The table: one 8-byte pointer per node, in allocation order, as the registry's slots.
    #[expect(
        clippy::vec_box,
        reason = "the point: a table of pointers to nodes allocated one by one, as the registry's"
    )]
    table: Vec<Box<Node>>,
    order: Permutation,
    /// How many nodes were touched: the sum of their [`REFS`] words.
    touched: u64,
}

impl Floor {
    fn new(n: usize) -> Floor {
        // One allocation per node, one after the other, as `create_context` does.
        let table: Vec<Box<Node>> = (0..n).map(|_| Box::new(Node::default())).collect();
        Floor {
            table,
            order: Permutation::new(n),
            touched: 0,
        }
    }

    /// Touches `iters` nodes, [`BATCH`] at a time, exactly as [`Population::cancel_by_id`] batches
    /// and times its cancels; returns the time spent in the accesses only.
    fn touch(&mut self, iters: u64) -> Duration {
        let mut timed = Duration::ZERO;
        let mut left = iters;
        let mut batch = [0_u32; BATCH];
        while left > 0 {
            // 1. Untimed: which nodes (positions only: neither the table nor a node is read).
            let positions = self.order.next_batch(left);
            let k = positions.len();
            batch[..k].copy_from_slice(positions);
            // 2. Timed: table entry, then the node.
            let table = black_box(&self.table);
            let mut all_ok = true;
            let start = Instant::now();
            for &position in &batch[..k] {
                all_ok &= touch(&table[black_box(position) as usize]);
            }
            timed += start.elapsed();
            assert!(all_ok, "a node's reference or lock was not taken");
            self.touched += k as u64;
            left -= k as u64;
        }
        timed
    }

    /// Checks that every access happened: the counts add up, every lock is free, the flag is set
    /// on every node touched.
    fn check(&self) {
        let mut total = 0;
        for node in &self.table {
            let refs = node.0[REFS].load(Ordering::Relaxed);
            assert_eq!(node.0[LOCK].load(Ordering::Relaxed), 0);
            assert_eq!(
                node.0[FLAGS].load(Ordering::Relaxed),
                u64::from(refs > 0) * CANCELLED_BIT
            );
            total += refs;
        }
        assert_eq!(total, self.touched, "memory floor: an access is missing");
    }
}

fn bench_memory_floor(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, n: usize) {
    // Created on first use, so a benchmark that the filter skips costs nothing.
    let mut floor: Option<Floor> = None;
    group.bench_function(name, |b| {
        let floor = floor.get_or_insert_with(|| Floor::new(n));
        b.iter_custom(|iters| floor.touch(iters));
    });
    if let Some(floor) = floor {
        floor.check();
    }
}

// ---------------------------------------------------------------------------------------------
// create + complete + free
// ---------------------------------------------------------------------------------------------

/// `iters` create + complete + free operations split over `threads` threads that start together;
/// returns the wall time from the first thread's start to the last thread's end.
fn create_complete(rdbss: &Rdbss<()>, threads: usize, iters: u64) -> Duration {
    let barrier = &Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = thread::scope(|s| {
        let workers: Vec<_> =
            (0..threads as u64)
                .map(|t| {
                    let share = iters / threads as u64 + u64::from(t < iters % threads as u64);
                    s.spawn(move || {
                        barrier.wait();
                        let start = Instant::now();
                        for _ in 0..share {
                            let ctx = rdbss.create_context(read_init(), ()).unwrap_or_else(
                                |(status, ())| panic!("create_context failed: {status:?}"),
                            );
                            ctx.complete_request(NtStatus::SUCCESS, 0)
                                .expect("the first completion");
                        }
                        (start, Instant::now())
                    })
                })
                .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a create/complete thread panicked"))
            .collect()
    });
    let start = spans
        .iter()
        .map(|s| s.0)
        .min()
        .expect("at least one thread");
    let end = spans
        .iter()
        .map(|s| s.1)
        .max()
        .expect("at least one thread");
    end - start
}

fn bench_create_complete(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, threads: usize) {
    let rdbss = new_instance();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| create_complete(&rdbss, threads, iters));
    });
    assert_eq!(rdbss.active_contexts(), 0, "{name}: a context was leaked");
}

fn run_benchmarks(c: &mut Criterion) {
    let mut group = c.benchmark_group(GROUP);
    for (name, n) in POPULATIONS {
        bench_cancel_by_id(&mut group, name, n);
    }
    for (name, n) in FLOOR_POPULATIONS {
        bench_memory_floor(&mut group, name, n);
    }
    group.throughput(Throughput::Elements(1));
    bench_create_complete(&mut group, CREATE_COMPLETE_1, 1);
    bench_create_complete(&mut group, CREATE_COMPLETE_2, 2);
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

struct MemoryFigures {
    contexts: usize,
    /// Live heap bytes the contexts added, as requested from the allocator.
    bytes: isize,
    /// Live allocations the contexts added.
    allocations: isize,
    /// `VmRSS` growth minus the handles' `Vec`, if known.
    resident: Option<isize>,
}

impl MemoryFigures {
    fn per_context(&self) -> f64 {
        self.bytes as f64 / self.contexts as f64
    }

    fn allocations_per_context(&self) -> f64 {
        self.allocations as f64 / self.contexts as f64
    }
}

/// `VmRSS` of this process in bytes (Linux only).
fn resident_bytes() -> Option<isize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: isize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn measure_memory(n: usize) -> MemoryFigures {
    let rdbss = new_instance();
    // Per-instance costs before counting: this thread's epoch registration with the instance's
    // collector (which also retires the handle of a previous instance), the first bucket.
    create_armed(&rdbss)
        .complete_request(NtStatus::SUCCESS, 0)
        .expect("warm-up completion");
    // The caller's handles: allocated before counting, so not counted.
    let mut held: Vec<ContextRef<()>> = Vec::with_capacity(n);
    let capacity = held.capacity();
    let resident_before = resident_bytes();
    LIVE_BYTES.store(0, Ordering::SeqCst);
    LIVE_ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    for _ in 0..n {
        held.push(create_armed(&rdbss));
    }
    COUNTING.store(false, Ordering::SeqCst);
    let resident_after = resident_bytes();
    assert_eq!(held.capacity(), capacity, "the handles' Vec grew");
    assert_eq!(rdbss.active_contexts(), n);
    let figures = MemoryFigures {
        contexts: n,
        bytes: LIVE_BYTES.load(Ordering::SeqCst),
        allocations: LIVE_ALLOCATIONS.load(Ordering::SeqCst),
        // The handles' pages were first touched during the window: not the crate's.
        resident: resident_before
            .zip(resident_after)
            .map(|(before, after)| after - before - (n * size_of::<ContextRef<()>>()) as isize),
    };
    drop(held);
    figures
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn report_memory(figures: &[MemoryFigures]) -> usize {
    let mut misses = 0;
    println!(
        "  memory per in-flight context (live heap bytes from the counting allocator; the caller's \
         ContextRef handles, {} B each, not included):",
        size_of::<ContextRef<()>>()
    );
    for (i, f) in figures.iter().enumerate() {
        let per = f.per_context();
        let node = size_of::<RxContext<()>>() as f64;
        let with_overhead = per + MALLOC_OVERHEAD * f.allocations_per_context();
        let ok = per <= BYTES_TARGET;
        // The first count is the one held to the target; the others are for the record.
        let tag = if i == 0 {
            if !ok {
                misses += 1;
            }
            verdict(ok)
        } else {
            "(reported)"
        };
        println!(
            "    {:>9} contexts: {per:>7.1} B/context   target <= {BYTES_TARGET}  {tag}",
            f.contexts
        );
        println!(
            "      = {node:.0} B node (size_of RxContext<()>) + {:.1} B registry share (slot \
             table buckets, epoch); {:.4} allocations/context",
            per - node,
            f.allocations_per_context()
        );
        println!(
            "      + malloc overhead, not visible to a counting allocator, estimated at \
             {MALLOC_OVERHEAD} B/allocation: {with_overhead:.1} B/context  {}",
            verdict(with_overhead <= BYTES_TARGET)
        );
        if i == 0 {
            if let Some(resident) = f.resident {
                println!(
                    "      cross-check: resident set grew by {:.1} B/context (page-granular, \
                     includes malloc's real overhead)",
                    resident as f64 / f.contexts as f64
                );
            }
        }
    }
    misses
}

// ---------------------------------------------------------------------------------------------
// Summary
// ---------------------------------------------------------------------------------------------

fn print_median(label: &str, found: Option<&(Median, PathBuf)>) {
    match found {
        Some((m, _)) => println!(
            "  {label:<38} {:>9.3} ns   ({:.0}% CI {:.3} .. {:.3} ns)",
            m.ns,
            m.confidence * 100.0,
            m.lower,
            m.upper
        ),
        None => println!("  {label:<38} unavailable (no estimates.json written by this run)"),
    }
}

fn report(snapshot: &Snapshot, memory: &[MemoryFigures]) {
    println!();
    println!("{GROUP} summary: criterion median point estimates of this run");
    let mut misses = 0;
    let timings = match common::no_measurement_reason() {
        Some(reason) => {
            println!("  ratios unavailable: {reason}");
            None
        }
        None => Some(Timings::read(snapshot)),
    };
    if let Some(timings) = &timings {
        misses += timings.report_cancel_by_id();
        timings.report_floor();
    }
    if memory.is_empty() {
        println!("  memory not measured (--list)");
    } else {
        misses += report_memory(memory);
    }
    if let Some(timings) = &timings {
        timings.report_throughput();
        timings.report_source(snapshot);
    }
    if misses > 0 {
        println!("  {misses} target(s) missed (reported only; a noisy machine can cause this)");
    }
    common::print_machine();
}

/// The fresh medians of this run, by benchmark.
struct Timings {
    found: Vec<(&'static str, Option<(Median, PathBuf)>)>,
}

impl Timings {
    fn read(snapshot: &Snapshot) -> Timings {
        Timings {
            found: BENCHMARKS
                .into_iter()
                .map(|name| (name, snapshot.fresh_median(name)))
                .collect(),
        }
    }

    fn entry(&self, name: &str) -> Option<&(Median, PathBuf)> {
        self.found
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, f)| f.as_ref())
    }

    fn median(&self, name: &str) -> Option<Median> {
        self.entry(name).map(|(m, _)| *m)
    }

    fn ratio(&self, numerator: &str, denominator: &str) -> Option<f64> {
        match (self.median(numerator), self.median(denominator)) {
            (Some(n), Some(d)) if d.ns > 0.0 => Some(n.ns / d.ns),
            _ => None,
        }
    }

    /// Prints the three medians and the ratios; returns the number of targets missed.
    fn report_cancel_by_id(&self) -> usize {
        let mut misses = 0;
        for (name, n) in POPULATIONS {
            print_median(&format!("cancel_by_id, {n} in flight"), self.entry(name));
        }
        let label = "ratio 1000000 / 16 in flight";
        match self.ratio(IN_FLIGHT_1M, IN_FLIGHT_16) {
            Some(r) => {
                let ok = r <= RATIO_TARGET;
                if !ok {
                    misses += 1;
                }
                println!(
                    "  {label:<38} = {r:>6.3}   target <= {RATIO_TARGET:.1}  {}",
                    verdict(ok)
                );
            }
            None => println!(
                "  {label:<38} unavailable (a median is missing)   target <= {RATIO_TARGET:.1}"
            ),
        }
        if let Some(r) = self.ratio(IN_FLIGHT_10K, IN_FLIGHT_16) {
            println!(
                "  {:<38} = {r:>6.3}   (reported)",
                "ratio 10000 / 16 in flight"
            );
        }
        misses
    }

    /// Prints the memory floor's medians, its own ratio and `cancel_by_id`'s against it (all
    /// reported: no target).
    fn report_floor(&self) {
        println!(
            "  memory floor: the same accesses with no rdbss code (table slot, then on an {} B node: \
             CAS word 0, lock CAS + store word 1, fetch_or word 8; size_of RxContext<()> = {} B)",
            size_of::<Node>(),
            size_of::<RxContext<()>>()
        );
        for (name, n) in FLOOR_POPULATIONS {
            print_median(&format!("memory floor, {n} nodes"), self.entry(name));
        }
        let floor = self.ratio(FLOOR_1M, FLOOR_16);
        match floor {
            Some(r) => println!(
                "  {:<38} = {r:>6.3}   (reported)",
                "floor ratio 1000000 / 16"
            ),
            None => println!(
                "  {:<38} unavailable (a median is missing)",
                "floor ratio 1000000 / 16"
            ),
        }
        if let Some(r) = self.ratio(FLOOR_10K, FLOOR_16) {
            println!("  {:<38} = {r:>6.3}   (reported)", "floor ratio 10000 / 16");
        }
        let label = "cancel_by_id ratio / floor ratio";
        match (self.ratio(IN_FLIGHT_1M, IN_FLIGHT_16), floor) {
            (Some(c), Some(f)) if f > 0.0 => {
                println!("  {label:<38} = {:>6.3}   (reported, 1000000 / 16)", c / f);
            }
            _ => println!("  {label:<38} unavailable (a median is missing)"),
        }
        // The growth in nanoseconds, which the ratios hide: how much of cancel_by_id's added cost
        // the floor's accesses account for.
        let growth = |big: &str, small: &str| {
            self.median(big)
                .zip(self.median(small))
                .map(|(b, s)| b.ns - s.ns)
        };
        if let (Some(c), Some(f)) = (
            growth(IN_FLIGHT_1M, IN_FLIGHT_16),
            growth(FLOOR_1M, FLOOR_16),
        ) {
            println!(
                "  {:<38} cancel_by_id {c:>7.3} ns, floor {f:>7.3} ns   (reported)",
                "added cost, 1000000 minus 16"
            );
        }
    }

    fn report_throughput(&self) {
        for (name, label) in [
            (CREATE_COMPLETE_1, "create+complete+free, 1 thread"),
            (CREATE_COMPLETE_2, "create+complete+free, 2 threads"),
        ] {
            match self.median(name) {
                Some(m) if m.ns > 0.0 => println!(
                    "  {label:<38} {:>10.0} ops/s   (median {:.3} ns/op; {:.0}% CI {:.0} .. {:.0} \
                     ops/s)",
                    1e9 / m.ns,
                    m.ns,
                    m.confidence * 100.0,
                    1e9 / m.upper,
                    1e9 / m.lower
                ),
                _ => println!("  {label:<38} unavailable (no estimates.json written by this run)"),
            }
        }
        if let Some(r) = self.ratio(CREATE_COMPLETE_1, CREATE_COMPLETE_2) {
            println!(
                "  {:<38} = {r:>6.3}   (reported; 2.0 would be perfect scaling)",
                "throughput 2 threads / 1 thread"
            );
        }
    }

    fn report_source(&self, snapshot: &Snapshot) {
        let source = self
            .found
            .iter()
            .find_map(|(_, f)| f.as_ref().map(|(_, path)| path));
        common::print_estimates_source(source.map(PathBuf::as_path), snapshot);
    }
}

fn main() {
    // Before anything runs: which estimates already exist, so only this run's count.
    let snapshot = Snapshot::take(GROUP, &BENCHMARKS);
    let list_only = std::env::args_os().any(|a| a == "--list");
    // Memory first, in a fresh process, so the resident-set cross-check sees new pages.
    let memory: Vec<MemoryFigures> = if list_only {
        Vec::new()
    } else {
        MEMORY_COUNTS.into_iter().map(measure_memory).collect()
    };
    let mut criterion = Criterion::default().configure_from_args();
    run_benchmarks(&mut criterion);
    criterion.final_summary();
    report(&snapshot, &memory);
}
