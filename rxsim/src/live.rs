//! Live mode: a real-time mini-redirector on a tokio runtime, serving requests submitted from
//! outside (the FUSE adapter turns each FUSE operation into one request).
//!
//! The batch simulator ([`crate::engine`]) generates its own workload in virtual or wall-clock
//! time; [`Live`] has no workload. The embedder creates a request's `RX_CONTEXT` with
//! [`Live::prepare`], keeps the returned [`ContextRef`] to cancel it (`ctx.cancel()`, or
//! [`Rdbss::cancel_by_id`] through [`Live::rdbss`]), and awaits [`Live::dispatch`], which resolves
//! exactly once with the request's [`LiveReply`], however it was completed.
//!
//! # The path of a request
//!
//! ```text
//! prepare ──> RX_CONTEXT (Rdbss::create_context; refused while draining)
//! dispatch ──> arm live_cancel ── Err(Cancelled) ──> complete STATUS_CANCELLED, send nothing
//!                  │ Ok
//!                  └─> exchange table ──> uplink actor ──latency──> Server::receive
//!                                                                     │ service time (+ slow file)
//!                      complete <── disarm Ok <── downlink actor <──latency── Server::finish
//!                                   disarm Err(Cancelled): the routine completed it; release only
//! cancel ──> live_cancel: CANCEL ──> uplink (after its request) ──> Server::cancel
//!            and complete STATUS_CANCELLED at once
//! ```
//!
//! One client (client 0) with one session talks to one [`Server`]. Each message's arrival time is
//! drawn by [`Network::deliver`] from the time it was sent (so `latency`, `jitter`, `loss`, `rto`
//! and `partitions` of the [`Config`] apply), and each direction is delivered in order by one
//! actor task. Service time is drawn from `config.service`, plus, for a read or a write of a
//! *slow file*, that file's extra latency; a slow read sits at the server for that long, where a
//! CANCEL aborts it (reads are cancellable at the server). Server crashes (`config.crashes`, times
//! from [`Live::new`]) disconnect every exchange of the old connection epoch with
//! `STATUS_CONNECTION_DISCONNECTED`; a request that reaches the server while it is down is failed
//! the same way.
//!
//! Not modelled in live mode: per-request timeouts (`config.timeout` is ignored, so a read of a
//! 10 s slow file is not timed out; the embedder cancels when its caller gives up), pipe ordering
//! and credit queueing (a request the server refuses for lack of credit completes with the
//! server's `STATUS_QUOTA_EXCEEDED`), the client-side dispatch and completion delays, workload
//! options (`clients`, `requests`, `depth`, `cancel_rate`, `mix`, `teardown_at`, `mode`,
//! `threads`) and injected bugs (`bug`; cancel routines are always armed).
//!
//! Timers: waits use tokio's timer, which has a granularity of about 1 ms, so a latency or a
//! service time of a few microseconds takes about a millisecond. With zero latency, jitter and
//! service time (and no loss or partition) nothing sleeps at all: a request goes through the two
//! actors and the server without touching the timer.
//!
//! # Invariants
//!
//! 1. **Exactly one completion per dispatched request**, by one of: [`Live::dispatch`] when arming
//!    is refused (cancelled before dispatch), the reply or disconnect path when its disarm returns
//!    `Ok`, or [`live_cancel`] when it runs (the disarm then returns `Err(Cancelled)` and that path
//!    only releases its handle). Completion is `complete_request` and then the reply sent on the
//!    request's oneshot, which only the first completion finds there.
//! 2. **Each direction of the session is in order.** Uplink messages are queued under one lock
//!    (`up`), in the order they are sent; the uplink actor delivers each at the later of its own
//!    arrival and the previous one's; likewise downlink. A dispatch arms its routine and queues its
//!    request under `up`, and the routine queues its CANCEL under `up`, so a CANCEL never overtakes
//!    its request.
//! 3. **Every handle the live instance holds is in the exchange table**, keyed by message id, from
//!    just after arming until the exchange's reply, its disconnect, or the instance's drop (which
//!    disconnects what is left); messages on the network carry ids, never handles. So once every
//!    exchange has answered and the embedder has dropped its handles, the instance drains to zero.
//! 4. **Nothing keeps the instance alive but [`Live`] handles**: actors, timers and contexts hold
//!    a `Weak`, and the actors stop when the instance's channels close.
//! 5. **The routine never blocks**: it takes only the `up` lock (held by others for an arm, a map
//!    insert and a channel send) and sends on unbounded channels and the oneshot.
//! 6. **Lock order**: `up`, then the server's lock or `table`. No lock of this module is held while
//!    a handle is dropped or the core is called to cancel, so a context freed meanwhile (whose
//!    drop takes `ids`) cannot deadlock.
//! 7. **No panics on bad input**: a context of another instance or a second dispatch of one
//!    context gives a status; a time parameter above [`MAX_LIVE_MICROS`] is refused by
//!    [`Live::new`], and a slow file's extra time saturates, so no run time overflows.

use crate::config::{Config, Latency, Micros, OpKind, Window};
use crate::engine::initial_share;
use crate::net::{sample, Network};
use crate::server::{Op, Received, Reply, Request, Server};
use rand::SeedableRng;
use rand_pcg::Pcg64Mcg;
use rdbss::{
    ContextInit, ContextRef, DrainStatus, MajorFunction, NtStatus, Rdbss, RequestId, RxContext,
};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The only client of the live session.
const CLIENT: u32 = 0;

/// How often [`Live::shutdown`] looks for requests created just before the drain started.
const SHUTDOWN_SWEEP: Duration = Duration::from_millis(10);

/// The longest time parameter live mode accepts (about 35 years): with it, no sum of run times
/// overflows (invariant 7).
pub const MAX_LIVE_MICROS: Micros = 1 << 50;

/// Refuses time parameters so large that run times could overflow (invariant 7).
fn check_times(config: &Config) -> Result<(), String> {
    let latency = |l: Latency| match l {
        Latency::Fixed(a) | Latency::Exp(a) => a,
        Latency::Uniform(a, b) | Latency::Normal(a, b) => a.max(b),
    };
    let windows = config.partitions.iter().chain(&config.crashes);
    let times = [
        ("--latency", latency(config.latency)),
        ("--jitter", config.jitter),
        ("--service", latency(config.service)),
        ("--rto", config.rto),
    ]
    .into_iter()
    .chain(windows.flat_map(|w| {
        [
            ("--partition/--crash", w.start),
            ("--partition/--crash", w.length),
        ]
    }));
    for (name, micros) in times {
        if micros > MAX_LIVE_MICROS {
            return Err(format!("{name}: {micros}us is too long for live mode"));
        }
    }
    Ok(())
}

/// An instant no wait reaches (about 30 years from now).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent-enough state to go on.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The result of one request, as [`Live::dispatch`] resolves.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LiveReply {
    /// The final status: the server's, or `STATUS_CANCELLED`, `STATUS_CONNECTION_DISCONNECTED`,
    /// `STATUS_QUOTA_EXCEEDED` (no credit), ...
    pub status: NtStatus,
    /// Data returned (read, directory listing, pipe echo).
    pub data: Vec<u8>,
    /// A number returned (file id, file size, bytes read or written).
    pub info: u64,
}

impl LiveReply {
    /// A reply with only a status.
    pub fn status(status: NtStatus) -> Self {
        LiveReply {
            status,
            data: Vec::new(),
            info: 0,
        }
    }
}

/// What the live mini-redirector counted. Every dispatched request is in exactly one of
/// `completed_ok`, `completed_error`, `cancelled`, `refused_at_arm`, `disconnected`, or still in
/// flight ([`LiveStats::completed`]).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug, Serialize)]
pub struct LiveStats {
    /// Requests dispatched (including those refused at arm).
    pub dispatched: u64,
    /// Completed by the server's reply with a success status.
    pub completed_ok: u64,
    /// Completed by the server's reply with an error status (including a refusal for lack of
    /// credit).
    pub completed_error: u64,
    /// Completed by the cancel routine with `STATUS_CANCELLED` (the cancel won).
    pub cancelled: u64,
    /// Of the reply completions, those whose context was cancelled after the reply path disarmed
    /// the routine: the cancel lost the race and the reply completed the request normally.
    pub cancel_lost_race: u64,
    /// Cancelled before dispatch: arming was refused, the request completed with
    /// `STATUS_CANCELLED` and was never sent.
    pub refused_at_arm: u64,
    /// Completed with `STATUS_CONNECTION_DISCONNECTED` by a server crash (or sent while the server
    /// was down).
    pub disconnected: u64,
    /// CANCEL messages the routine sent to the server.
    pub server_cancels_sent: u64,
    /// Replies for an exchange no longer in the table (an old connection epoch).
    pub stale_replies: u64,
    /// Messages lost and retransmitted.
    pub retransmits: u64,
    /// Messages held back by a partition.
    pub partitioned: u64,
}

impl LiveStats {
    /// Requests completed, by any path.
    pub fn completed(&self) -> u64 {
        self.completed_ok
            + self.completed_error
            + self.cancelled
            + self.refused_at_arm
            + self.disconnected
    }
}

#[derive(Default)]
struct Counters {
    dispatched: AtomicU64,
    completed_ok: AtomicU64,
    completed_error: AtomicU64,
    cancelled: AtomicU64,
    cancel_lost_race: AtomicU64,
    refused_at_arm: AtomicU64,
    disconnected: AtomicU64,
    server_cancels_sent: AtomicU64,
    stale_replies: AtomicU64,
    retransmits: AtomicU64,
    partitioned: AtomicU64,
    in_flight: AtomicUsize,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// The mini-redirector's part of each live `RX_CONTEXT` (`MRxContext`).
pub struct LiveRequest {
    /// The live instance (invariant 4).
    live: Weak<Inner>,
    kind: OpKind,
    /// The operation, taken when the request is dispatched.
    op: Mutex<Option<Op>>,
    /// The exchange's message id, set before the routine is armed.
    msg: AtomicU64,
    /// The connection epoch the exchange went out on, set before the routine is armed.
    epoch: AtomicU32,
    /// The context's request id (0 until `prepare` stores it), for the shutdown sweep.
    id: AtomicU64,
    /// The instance's set of ids to sweep (not through `live`: a context freed late must not be
    /// the one that drops the instance).
    ids: Arc<Mutex<HashSet<u64>>>,
    dispatched: AtomicBool,
    /// Where the one completion sends its reply (invariant 1).
    done: Mutex<Option<oneshot::Sender<LiveReply>>>,
}

impl LiveRequest {
    /// The kind of operation.
    pub fn kind(&self) -> OpKind {
        self.kind
    }

    /// The exchange's message id (0 before dispatch).
    pub fn msg(&self) -> u64 {
        self.msg.load(Ordering::Acquire)
    }

    /// The connection epoch the exchange went out on (0 before dispatch).
    pub fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether [`Live::dispatch`] was called for it.
    pub fn is_dispatched(&self) -> bool {
        self.dispatched.load(Ordering::Acquire)
    }
}

impl fmt::Debug for LiveRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveRequest")
            .field("kind", &self.kind)
            .field("msg", &self.msg())
            .field("epoch", &self.epoch())
            .field("dispatched", &self.is_dispatched())
            .finish_non_exhaustive()
    }
}

impl Drop for LiveRequest {
    fn drop(&mut self) {
        // A context freed without being completed (prepared, never dispatched) leaves the sweep.
        lock(&self.ids).remove(self.id.get_mut());
    }
}

/// How a request was completed (which counter).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum How {
    Reply { lost_race: bool },
    Cancelled,
    Refused,
    Disconnected,
}

/// `RxCompleteRequest` plus the reply to the waiting [`Live::dispatch`] (invariant 1).
fn complete(ctx: &RxContext<LiveRequest>, reply: LiveReply, how: How) {
    let m = ctx.minirdr();
    let sender = lock(&m.done).take();
    // A second completion is the core's MULTIPLE_IRP_COMPLETE_REQUESTS bug check: let it see it.
    let information = usize::try_from(reply.info).unwrap_or(usize::MAX);
    let _ = ctx.complete_request(reply.status, information);
    let Some(sender) = sender else {
        return;
    };
    if let Some(inner) = m.live.upgrade() {
        let c = &inner.counters;
        match how {
            How::Reply { lost_race } => {
                if reply.status.is_success() {
                    bump(&c.completed_ok, 1);
                } else {
                    bump(&c.completed_error, 1);
                }
                if lost_race {
                    bump(&c.cancel_lost_race, 1);
                }
            }
            How::Cancelled => bump(&c.cancelled, 1),
            How::Refused => bump(&c.refused_at_arm, 1),
            How::Disconnected => bump(&c.disconnected, 1),
        }
        c.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
    lock(&m.ids).remove(&m.id.load(Ordering::Acquire));
    // The embedder gave up waiting (dropped the future): the reply goes nowhere.
    let _ = sender.send(reply);
}

/// `MRxCancel` of live mode: sends CANCEL for the exchange to the server, through the uplink so it
/// arrives after its request (invariant 2), and, as the side that now owns completion, completes
/// the request with `STATUS_CANCELLED`, which resolves its [`Live::dispatch`]. Never blocks
/// (invariant 5).
#[doc(alias = "MRxSmbCancel")]
pub fn live_cancel(ctx: &RxContext<LiveRequest>) -> NtStatus {
    let m = ctx.minirdr();
    if let Some(inner) = m.live.upgrade() {
        inner.send_up(Up::Cancel {
            msg: m.msg(),
            epoch: m.epoch(),
        });
        bump(&inner.counters.server_cancels_sent, 1);
    }
    // Even with the instance gone, the waiting caller gets its answer.
    complete(ctx, LiveReply::status(NtStatus::CANCELLED), How::Cancelled);
    NtStatus::SUCCESS
}

/// A message on the network, stamped with when it was sent (run clock).
struct Msg<T> {
    sent: Micros,
    body: T,
}

/// What goes from the client to the server.
enum Up {
    Request {
        request: Request,
        /// A slow file's extra service time.
        extra: Micros,
    },
    Cancel {
        msg: u64,
        epoch: u32,
    },
}

/// An exchange waiting for its reply (invariant 3).
struct Exchange {
    ctx: ContextRef<LiveRequest>,
    epoch: u32,
}

struct Inner {
    config: Config,
    rdbss: Rdbss<LiveRequest>,
    server: Server,
    network: Network,
    /// Slow files and their extra service time.
    slow: HashMap<String, Micros>,
    rng: Mutex<Pcg64Mcg>,
    start: Instant,
    handle: Handle,
    next_msg: AtomicU64,
    /// The uplink's sending side; its lock orders the uplink (invariant 2).
    up: Mutex<mpsc::UnboundedSender<Msg<Up>>>,
    down: mpsc::UnboundedSender<Msg<Reply>>,
    /// Exchanges waiting for their reply, by message id (invariant 3).
    table: Mutex<HashMap<u64, Exchange>>,
    /// Ids of the requests prepared and not completed, for the shutdown sweep.
    ids: Arc<Mutex<HashSet<u64>>>,
    counters: Counters,
}

impl Inner {
    /// Microseconds since the instance started (the clock of `config.partitions`/`crashes`).
    fn now(&self) -> Micros {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(Micros::MAX)
    }

    /// The instant of run time `at` (saturated far in the future; invariant 7).
    fn instant(&self, at: Micros) -> Instant {
        self.start
            .checked_add(Duration::from_micros(at))
            .unwrap_or_else(far_future)
    }

    /// Waits until run time `at`; does not touch the timer if `at` has passed.
    async fn sleep_until(weak: &Weak<Inner>, at: Micros) {
        let deadline = match weak.upgrade() {
            Some(inner) if at > inner.now() => inner.instant(at),
            _ => return,
        };
        tokio::time::sleep_until(deadline).await;
    }

    /// When a message sent at `sent` arrives, given that the previous one in its direction
    /// arrived at `last` (invariant 2).
    fn arrival(&self, sent: Micros, last: &mut Micros) -> Micros {
        let delivery = self.network.deliver(sent, &mut *lock(&self.rng));
        if delivery.retransmits > 0 {
            bump(&self.counters.retransmits, u64::from(delivery.retransmits));
        }
        if delivery.partitioned {
            bump(&self.counters.partitioned, 1);
        }
        let at = delivery.at.max(*last);
        *last = at;
        at
    }

    fn send_up(&self, body: Up) {
        let up = lock(&self.up);
        // The actor is gone only when the runtime is shutting down: nothing to send to.
        let _ = up.send(Msg {
            sent: self.now(),
            body,
        });
    }

    fn send_down(&self, reply: Reply) {
        let _ = self.down.send(Msg {
            sent: self.now(),
            body: reply,
        });
    }

    /// A slow file's extra service time, for a read or a write of it.
    fn slow_extra(&self, op: &Op) -> Micros {
        match op {
            Op::Read { path, .. } | Op::Write { path, .. } => {
                self.slow.get(path).copied().unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// Arms the routine and sends the request (invariants 1-3). `Err` is an immediate answer
    /// (the request was not taken), `Ok` the receiver its completion will answer.
    fn start(
        self: &Arc<Self>,
        ctx: &ContextRef<LiveRequest>,
    ) -> Result<oneshot::Receiver<LiveReply>, LiveReply> {
        let m = ctx.minirdr();
        // Invariant 7: only this instance's contexts, each dispatched once.
        if m.live.as_ptr() != Arc::as_ptr(self) {
            return Err(LiveReply::status(NtStatus::INVALID_PARAMETER));
        }
        if m.dispatched.swap(true, Ordering::AcqRel) {
            return Err(LiveReply::status(NtStatus::INVALID_DEVICE_STATE));
        }
        let Some(op) = lock(&m.op).take() else {
            return Err(LiveReply::status(NtStatus::INVALID_DEVICE_STATE));
        };
        let (sender, receiver) = oneshot::channel();
        *lock(&m.done) = Some(sender);
        bump(&self.counters.dispatched, 1);
        self.counters.in_flight.fetch_add(1, Ordering::AcqRel);
        let extra = self.slow_extra(&op);
        let msg = self.next_msg.fetch_add(1, Ordering::Relaxed);

        let up = lock(&self.up);
        let epoch = self.server.epoch();
        // The routine may run the moment it is armed: its message id and epoch must be there.
        m.msg.store(msg, Ordering::Release);
        m.epoch.store(epoch, Ordering::Release);
        if ctx.set_minirdr_cancel_routine(Some(live_cancel)).is_err() {
            // Cancelled before dispatch: complete now, never send (invariant 1).
            drop(up);
            complete(ctx, LiveReply::status(NtStatus::CANCELLED), How::Refused);
            return Ok(receiver);
        }
        lock(&self.table).insert(
            msg,
            Exchange {
                ctx: ctx.clone(),
                epoch,
            },
        );
        let sent = up.send(Msg {
            sent: self.now(),
            body: Up::Request {
                request: Request {
                    client: CLIENT,
                    msg,
                    epoch,
                    op,
                },
                extra,
            },
        });
        drop(up);
        if sent.is_err() {
            // The runtime is shutting down: the exchange can never be answered.
            self.disconnect_one(msg, epoch);
        }
        Ok(receiver)
    }

    /// A message reaches the server at run time `at`.
    fn server_receives(self: &Arc<Self>, body: Up, at: Micros) {
        match body {
            Up::Request { request, extra } => {
                let (msg, epoch) = (request.msg, request.epoch);
                match self.server.receive(request) {
                    Received::Started { finishes: true } => {
                        let service = sample(self.config.service, &mut *lock(&self.rng));
                        let done = at.saturating_add(service).saturating_add(extra);
                        if service == 0 && extra == 0 {
                            self.server_finish(msg, epoch);
                        } else {
                            let weak = Arc::downgrade(self);
                            self.handle.spawn(async move {
                                Inner::sleep_until(&weak, done).await;
                                if let Some(inner) = weak.upgrade() {
                                    inner.server_finish(msg, epoch);
                                }
                            });
                        }
                    }
                    // Change-notify: answered by a change or a CANCEL.
                    Received::Started { finishes: false } => {}
                    // No credit: the refusal is the reply (STATUS_QUOTA_EXCEEDED).
                    Received::Rejected(reply) => self.send_down(reply),
                    // An old connection, or the server is down.
                    Received::Dropped => self.disconnect_one(msg, epoch),
                }
            }
            Up::Cancel { msg, epoch } => {
                if let Some(reply) = self.server.cancel(CLIENT, msg, epoch) {
                    self.send_down(reply);
                }
            }
        }
    }

    fn server_finish(&self, msg: u64, epoch: u32) {
        for reply in self.server.finish(CLIENT, msg, epoch) {
            self.send_down(reply);
        }
    }

    /// Takes exchange `msg` of connection `epoch` out of the table, if it is there.
    fn take_exchange(&self, msg: u64, epoch: u32) -> Option<Exchange> {
        let mut table = lock(&self.table);
        match table.get(&msg) {
            Some(exchange) if exchange.epoch == epoch => table.remove(&msg),
            _ => None,
        }
    }

    /// A reply reaches the client.
    fn response(&self, reply: Reply) {
        match self.take_exchange(reply.msg, reply.epoch) {
            None => bump(&self.counters.stale_replies, 1),
            Some(exchange) => {
                let reply_to = LiveReply {
                    status: reply.status,
                    data: reply.data,
                    info: reply.info,
                };
                exchange_done(exchange.ctx, reply_to, false);
            }
        }
    }

    /// The connection of exchange `msg` is gone.
    fn disconnect_one(&self, msg: u64, epoch: u32) {
        if let Some(exchange) = self.take_exchange(msg, epoch) {
            exchange_done(
                exchange.ctx,
                LiveReply::status(NtStatus::CONNECTION_DISCONNECTED),
                true,
            );
        }
    }

    /// The server crashed: every exchange not of the current epoch is disconnected.
    fn disconnect_old(&self) {
        let epoch = self.server.epoch();
        let gone: Vec<Exchange> = {
            let mut table = lock(&self.table);
            let old: Vec<u64> = table
                .iter()
                .filter(|(_, e)| e.epoch != epoch)
                .map(|(&msg, _)| msg)
                .collect();
            old.iter().filter_map(|msg| table.remove(msg)).collect()
        };
        for exchange in gone {
            exchange_done(
                exchange.ctx,
                LiveReply::status(NtStatus::CONNECTION_DISCONNECTED),
                true,
            );
        }
    }

    /// Cancels, through the core, every request prepared and not completed.
    fn cancel_all(&self) {
        let ids: Vec<u64> = lock(&self.ids).iter().copied().collect();
        for id in ids {
            // Already completed or freed: nothing to do.
            let _ = self.rdbss.cancel_by_id(RequestId::from_u64(id));
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Invariant 3: the exchanges still waiting can never be answered now.
        let left: Vec<Exchange> = lock(&self.table).drain().map(|(_, e)| e).collect();
        for exchange in left {
            exchange_done(
                exchange.ctx,
                LiveReply::status(NtStatus::CONNECTION_DISCONNECTED),
                true,
            );
        }
    }
}

/// The exchange is over (reply or disconnect): disarm, and complete only if disarming won
/// (invariant 1).
fn exchange_done(ctx: ContextRef<LiveRequest>, reply: LiveReply, disconnected: bool) {
    match ctx.set_minirdr_cancel_routine(None) {
        Ok(()) => {
            let how = if disconnected {
                How::Disconnected
            } else {
                How::Reply {
                    // Cancelled after the disarm: the cancel lost the race.
                    lost_race: ctx.is_cancelled(),
                }
            };
            complete(&ctx, reply, how);
        }
        // The cancel side owns completion: the routine completed the request.
        Err(_cancelled) => {}
    }
    drop(ctx);
}

/// One direction of the session: delivers its messages in order (invariant 2).
async fn link<T>(
    weak: Weak<Inner>,
    mut queue: mpsc::UnboundedReceiver<Msg<T>>,
    deliver: fn(&Arc<Inner>, T, Micros),
) {
    let mut last = 0;
    while let Some(Msg { sent, body }) = queue.recv().await {
        let Some(at) = weak.upgrade().map(|inner| inner.arrival(sent, &mut last)) else {
            return;
        };
        Inner::sleep_until(&weak, at).await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        deliver(&inner, body, at);
    }
}

/// Server crashes and restarts, at the run times of `config.crashes`.
async fn crashes(weak: Weak<Inner>, mut windows: Vec<Window>) {
    windows.sort_by_key(|w| w.start);
    for window in windows {
        Inner::sleep_until(&weak, window.start).await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        inner.server.crash();
        inner.disconnect_old();
        drop(inner);
        Inner::sleep_until(&weak, window.end()).await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        inner.server.restart();
    }
}

/// The `IRP_MJ_*` (and minor) function of an operation.
fn functions(op: &Op) -> (MajorFunction, u8) {
    match op {
        Op::Create { .. } => (MajorFunction::CREATE, 0),
        Op::Read { .. } => (MajorFunction::READ, 0),
        Op::Write { .. } => (MajorFunction::WRITE, 0),
        Op::QueryInfo { .. } => (MajorFunction::QUERY_INFORMATION, 0),
        Op::DirEnum { .. } => (MajorFunction::DIRECTORY_CONTROL, 1), // IRP_MN_QUERY_DIRECTORY
        Op::ChangeNotify { .. } => (MajorFunction::DIRECTORY_CONTROL, 2), // IRP_MN_NOTIFY_CHANGE_DIRECTORY
        Op::PipeTransact { .. } => (MajorFunction::FILE_SYSTEM_CONTROL, 0),
        Op::Close { .. } => (MajorFunction::CLOSE, 0),
        // FileDispositionInformation and FileEndOfFileInformation.
        Op::Delete { .. } | Op::Truncate { .. } => (MajorFunction::SET_INFORMATION, 0),
    }
}

/// The live mini-redirector: one RDBSS instance, one server, one network and one session. Clone
/// it to share it (a handle to the same instance).
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live")
            .field("rdbss", &self.inner.rdbss)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Live {
    /// Validates `config` ([`Config::validate`]) and builds the instance: one
    /// `Rdbss<LiveRequest>`, one [`Server`] holding [`initial_share`] plus the slow files (created
    /// empty if missing; `path` without a leading `/`, e.g. `d0/slow`), the [`Network`], and a
    /// generator seeded with `config.seed`. Starts the actors on the current tokio runtime: must
    /// be called inside one (else `Err`); see [`Live::with_handle`].
    pub fn new(config: &Config, slow_files: &[(String, Duration)]) -> Result<Live, String> {
        let handle = Handle::try_current()
            .map_err(|_| "Live::new must be called inside a tokio runtime".to_string())?;
        Self::with_handle(config, slow_files, handle)
    }

    /// [`Live::new`] with the runtime's handle given.
    pub fn with_handle(
        config: &Config,
        slow_files: &[(String, Duration)],
        handle: Handle,
    ) -> Result<Live, String> {
        config.validate()?;
        check_times(config)?;
        let mut share = initial_share();
        let mut slow = HashMap::new();
        for (path, extra) in slow_files {
            let path = path.trim_start_matches('/');
            if path.is_empty() || path.ends_with('/') || path.contains("//") {
                return Err(format!("slow file `{path}` is not a file path"));
            }
            let prefix = format!("{path}/");
            if share.iter().any(|(p, _)| p.starts_with(&prefix)) {
                return Err(format!("slow file `{path}` is a directory of the share"));
            }
            if !share.iter().any(|(p, _)| p == path) {
                share.push((path.to_string(), Vec::new()));
            }
            let micros = u64::try_from(extra.as_micros()).unwrap_or(Micros::MAX);
            slow.insert(path.to_string(), micros);
        }
        let (up, up_queue) = mpsc::unbounded_channel();
        let (down, down_queue) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            config: config.clone(),
            rdbss: Rdbss::new(),
            server: Server::new(1, config.credits, &share, false),
            network: Network::new(config),
            slow,
            rng: Mutex::new(Pcg64Mcg::seed_from_u64(config.seed)),
            start: Instant::now(),
            handle: handle.clone(),
            next_msg: AtomicU64::new(1),
            up: Mutex::new(up),
            down,
            table: Mutex::new(HashMap::new()),
            ids: Arc::default(),
            counters: Counters::default(),
        });
        let weak = Arc::downgrade(&inner);
        handle.spawn(link(weak.clone(), up_queue, Inner::server_receives));
        handle.spawn(link(weak.clone(), down_queue, |inner, reply, _| {
            inner.response(reply)
        }));
        if !config.crashes.is_empty() {
            handle.spawn(crashes(weak, config.crashes.clone()));
        }
        Ok(Live { inner })
    }

    /// The RDBSS instance (to cancel by id, check the drain, count active contexts).
    pub fn rdbss(&self) -> &Rdbss<LiveRequest> {
        &self.inner.rdbss
    }

    /// The server (its files, stats, credits).
    pub fn server(&self) -> &Server {
        &self.inner.server
    }

    /// The configuration the instance runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Creates the request's `RX_CONTEXT`, not sent yet. `Err(status)` if the instance refuses it
    /// (`STATUS_INVALID_DEVICE_STATE` while draining, after [`Live::shutdown`]).
    ///
    /// Keep the handle to cancel the request (`ctx.cancel()`); drop it once the request is
    /// completed, or the instance never drains.
    pub fn prepare(&self, op: Op) -> Result<ContextRef<LiveRequest>, NtStatus> {
        let (major_function, minor_function) = functions(&op);
        let mini = LiveRequest {
            live: Arc::downgrade(&self.inner),
            kind: op.kind(),
            op: Mutex::new(Some(op)),
            msg: AtomicU64::new(0),
            epoch: AtomicU32::new(0),
            id: AtomicU64::new(0),
            dispatched: AtomicBool::new(false),
            done: Mutex::new(None),
            ids: self.inner.ids.clone(),
        };
        let init = ContextInit {
            major_function,
            minor_function,
            ..ContextInit::default()
        };
        let ctx = self
            .inner
            .rdbss
            .create_context(init, mini)
            .map_err(|(status, _)| status)?;
        let id = ctx.id().as_u64();
        ctx.minirdr().id.store(id, Ordering::Release);
        lock(&self.inner.ids).insert(id);
        Ok(ctx)
    }

    /// Sends the request: arms [`live_cancel`] (if the context was cancelled before dispatch,
    /// completes it at once with `STATUS_CANCELLED` and sends nothing), then uplink, server,
    /// service time, downlink, disarm, and completion if the disarm won.
    ///
    /// The exchange starts when this is called, not when the future is first polled. The future
    /// resolves exactly once, when the context is completed, with the result, whichever path
    /// completed it: the reply, the cancel routine, a refused arm, a disconnect by a crash, or
    /// [`Live::shutdown`] (which cancels). Dropping it does not cancel the request. A context of
    /// another instance resolves at once with `STATUS_INVALID_PARAMETER`, a second dispatch of
    /// one context with `STATUS_INVALID_DEVICE_STATE`, neither changing the request.
    pub fn dispatch(
        &self,
        ctx: &ContextRef<LiveRequest>,
    ) -> impl Future<Output = LiveReply> + Send + 'static {
        let started = self.inner.start(ctx);
        async move {
            match started {
                Err(reply) => reply,
                // The sender went away uncompleted: only if the context was freed without
                // completion, which invariant 3 rules out while the instance lives.
                Ok(receiver) => receiver
                    .await
                    .unwrap_or_else(|_| LiveReply::status(NtStatus::CONNECTION_DISCONNECTED)),
            }
        }
    }

    /// What the instance counted so far.
    pub fn stats(&self) -> LiveStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LiveStats {
            dispatched: get(&c.dispatched),
            completed_ok: get(&c.completed_ok),
            completed_error: get(&c.completed_error),
            cancelled: get(&c.cancelled),
            cancel_lost_race: get(&c.cancel_lost_race),
            refused_at_arm: get(&c.refused_at_arm),
            disconnected: get(&c.disconnected),
            server_cancels_sent: get(&c.server_cancels_sent),
            stale_replies: get(&c.stale_replies),
            retransmits: get(&c.retransmits),
            partitioned: get(&c.partitioned),
        }
    }

    /// Requests dispatched and not completed.
    pub fn in_flight(&self) -> usize {
        self.inner.counters.in_flight.load(Ordering::Acquire)
    }

    /// Exchanges waiting for their reply from the server (a cancelled one stays until the
    /// server answers its CANCEL, or its non-cancellable work ends).
    pub fn exchanges_open(&self) -> usize {
        lock(&self.inner.table).len()
    }

    /// Microseconds since the instance started: the clock of `config.partitions` and
    /// `config.crashes`.
    pub fn now(&self) -> Micros {
        self.inner.now()
    }

    /// Whether the instance has drained ([`Rdbss::drain_status`]).
    pub fn drain_status(&self) -> DrainStatus {
        self.inner.rdbss.drain_status()
    }

    /// Stops accepting requests ([`Rdbss::start_drain`]), cancels every request prepared and not
    /// completed through the core (`cancel_by_id`: dispatched ones run [`live_cancel`], prepared
    /// ones will be refused at arm), and waits up to `timeout` for the instance to drain to zero
    /// active contexts. `Err(n)`: `n` contexts are still alive at the deadline (a handle the
    /// embedder still holds, or an exchange still waiting for its server's answer, such as a
    /// write of a slow file, which the server does not abort).
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), usize> {
        let inner = &self.inner;
        inner.rdbss.start_drain();
        let deadline = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(far_future);
        let mut next_sweep = Instant::now();
        loop {
            // A request created just before the drain started may have been missed by a sweep
            // (its id was not recorded yet): sweep again now and then.
            if Instant::now() >= next_sweep {
                inner.cancel_all();
                next_sweep = Instant::now() + SHUTDOWN_SWEEP;
            }
            match inner.rdbss.drain_status() {
                DrainStatus::Drained => return Ok(()),
                DrainStatus::Active(n) if Instant::now() >= deadline => return Err(n),
                DrainStatus::Active(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
