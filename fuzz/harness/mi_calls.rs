//! `mi_calls`: sequences over `rdbss::mi` (`MI_Session` / `MI_Operation` / `MI_Context`),
//! decoded from the fuzzer's bytes with `arbitrary`: start, cancel (typed and by id, with any
//! caller and any raw reason), close (any caller), `register_cancel`, `post_instance`,
//! `post_result`, `get_result`, cloning and dropping provider contexts, shutdown.
//!
//! A small model of each operation (cancelled and the first reason, the provider slot's
//! `armed` / `delivered` / `posted` / `cancel_completes`, the core routine armed or not, whether
//! it finished, the client's final result and unread instances) predicts every result. After
//! every call: results and error codes match (`ACCESS_DENIED` for another caller,
//! `INVALID_PARAMETER` for closed / unknown ids, bad reasons, posted contexts,
//! `NOT_SUPPORTED` for invoke, `SERVER_LIMITS_EXCEEDED` / `SERVER_IS_SHUTTING_DOWN` at start);
//! the callbacks called are exactly the expected ones, each with the first cancel's reason, at
//! most once per operation, only on a cancelled operation and never after the provider posted
//! its final result; `operations_in_use` (the quota) and `live_operations` match; every open
//! client's final result matches; no bug check; IRQL `PASSIVE_LEVEL`. At the end (providers
//! dropped, clients closed): the quota is back to zero, no operation is live, every operation
//! finished once, and a cancel that came before the provider's post reached a registered
//! callback exactly once (never lost).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Unstructured};

use rdbss::bugcheck::{self, BugCheckPolicy};
use rdbss::irql::{self, Irql};
use rdbss::mi::{
    MiCallerId, MiCancellationReason, MiContext, MiDelivery, MiFinalResult, MiOperation,
    MiOperationKind, MiPosted, MiRegistration, MiResult, MiSession,
};
use rdbss::RequestId;

/// Operations per input, at most.
pub const MAX_OPS: usize = 128;
/// Operations started at most per input.
const MAX_STARTED: usize = 24;

#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum OpSel {
    /// One of the operations started (also closed and finished ones).
    Started(u8),
    /// Any id.
    Raw(u64),
}

#[derive(Arbitrary, Clone, Debug)]
pub enum Op {
    Start { caller: u8, invoke: bool },
    Cancel { o: u8, caller: u8, reason: u8 },
    OperationCancel { o: OpSel, caller: u8, reason: u8 },
    Close { o: u8, caller: u8 },
    Register { o: u8, clone: u8 },
    PostInstance { o: u8, clone: u8, value: u8 },
    PostResult { o: u8, clone: u8, result: u8 },
    GetResult { o: u8 },
    CloneProvider { o: u8 },
    DropProvider { o: u8, clone: u8 },
    Shutdown,
}

/// Decodes an input: the quota (1 to 4), then at most [`MAX_OPS`] operations.
pub fn decode(data: &[u8]) -> (usize, Vec<Op>) {
    let mut u = Unstructured::new(data);
    let quota = usize::from(u.arbitrary::<u8>().unwrap_or(0) % 4) + 1;
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS && !u.is_empty() {
        match Op::arbitrary(&mut u) {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    (quota, ops)
}

fn caller(c: u8) -> MiCallerId {
    MiCallerId(u64::from(c % 3))
}

const REASONS: [MiCancellationReason; 4] = [
    MiCancellationReason::None,
    MiCancellationReason::Timeout,
    MiCancellationReason::Shutdown,
    MiCancellationReason::ServiceStop,
];

const RESULTS: [MiResult; 4] = [
    MiResult::OK,
    MiResult::FAILED,
    MiResult::NOT_FOUND,
    MiResult::ACCESS_DENIED,
];

/// A callback call: (operation, registration tag, reason).
type Log = Arc<Mutex<Vec<(usize, u32, MiCancellationReason)>>>;

struct Obj {
    id: RequestId,
    owner: MiCallerId,
    kind: MiOperationKind,
    client: Option<MiOperation<u8>>,
    providers: Vec<MiContext<u8>>,
    // Model.
    cancelled: bool,
    reason: Option<MiCancellationReason>,
    callback: Option<u32>,
    slot_armed: bool,
    core_armed: bool,
    delivered: bool,
    posted: bool,
    cancel_completes: bool,
    finished: bool,
    final_result: Option<MiFinalResult>,
    instances: VecDeque<u8>,
    closed: bool,
    // For the end checks.
    callback_calls: usize,
    registered_before_post: bool,
    cancelled_before_post: bool,
}

impl Obj {
    fn live(&self) -> bool {
        self.client.is_some() || !self.providers.is_empty()
    }
}

struct Harness {
    session: MiSession<u8>,
    quota: usize,
    objs: Vec<Obj>,
    shutdown: bool,
    log: Log,
    next_tag: u32,
    expected_calls: Vec<(usize, u32, MiCancellationReason)>,
}

fn pick<T>(v: &[T], i: u8) -> Option<usize> {
    (!v.is_empty()).then(|| usize::from(i) % v.len())
}

impl Harness {
    fn in_use(&self) -> usize {
        self.objs.iter().filter(|o| !o.finished).count()
    }

    fn set_final(&mut self, o: usize, result: MiFinalResult) {
        let obj = &mut self.objs[o];
        if obj.final_result.is_none() {
            obj.final_result = Some(result);
        }
    }

    fn finish_op(&mut self, o: usize) {
        // Completion happens once; the quota goes back with the first.
        self.objs[o].finished = true;
    }

    fn reason(&self, o: usize) -> MiCancellationReason {
        self.objs[o].reason.unwrap_or(MiCancellationReason::None)
    }

    /// `cancel_operation`'s effect on the model.
    fn predict_cancel(&mut self, o: usize, reason: MiCancellationReason) {
        let obj = &mut self.objs[o];
        if obj.reason.is_none() {
            obj.reason = Some(reason);
        }
        if obj.cancelled {
            return;
        }
        obj.cancelled = true;
        if !obj.posted {
            obj.cancelled_before_post = true;
        }
        if std::mem::take(&mut obj.core_armed) {
            // The routine: final result, the callback, completion.
            let reason = self.reason(o);
            self.set_final(o, MiFinalResult::cancelled(reason));
            let obj = &mut self.objs[o];
            if let Some(tag) = obj.callback.take() {
                obj.delivered = true;
                self.expected_calls.push((o, tag, reason));
            }
            assert!(!self.objs[o].finished, "routine on a finished operation");
            self.finish_op(o);
        } else {
            let reason = self.reason(o);
            self.set_final(o, MiFinalResult::cancelled(reason));
        }
    }

    /// `post_final(result)`'s effect; `None` for `INVALID_PARAMETER`.
    fn predict_post(&mut self, o: usize, result: MiResult) -> Option<MiPosted> {
        let obj = &mut self.objs[o];
        if obj.posted {
            return None;
        }
        obj.posted = true;
        obj.callback = None;
        if !obj.cancelled {
            obj.slot_armed = false;
            obj.core_armed = false;
            self.set_final(
                o,
                MiFinalResult {
                    result,
                    cancelled: None,
                },
            );
            self.finish_op(o);
            Some(MiPosted::Delivered)
        } else {
            if !(obj.slot_armed || obj.cancel_completes) {
                let reason = self.reason(o);
                self.set_final(o, MiFinalResult::cancelled(reason));
                self.finish_op(o);
            }
            Some(MiPosted::Discarded)
        }
    }

    /// Drops provider clone `c` of `o`; the last one posts `MI_RESULT_FAILED`.
    fn drop_provider(&mut self, o: usize, c: usize) {
        let provider = self.objs[o].providers.remove(c);
        if self.objs[o].providers.is_empty() {
            let _ = self.predict_post(o, MiResult::FAILED);
        }
        drop(provider);
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Start { caller: c, invoke } => {
                if self.objs.len() >= MAX_STARTED {
                    return;
                }
                let kind = if invoke {
                    MiOperationKind::Invoke
                } else {
                    MiOperationKind::Enumerate
                };
                let got = self.session.start_operation(caller(c), kind);
                if self.in_use() >= self.quota {
                    assert_eq!(got.err(), Some(MiResult::SERVER_LIMITS_EXCEEDED));
                    return;
                }
                if self.shutdown {
                    assert_eq!(got.err(), Some(MiResult::SERVER_IS_SHUTTING_DOWN));
                    return;
                }
                let (client, provider) = got.expect("start_operation within quota");
                assert_eq!(client.id(), provider.id());
                assert_eq!(client.kind(), kind);
                assert!(self.objs.iter().all(|o| o.id != client.id() || !o.live()));
                self.objs.push(Obj {
                    id: client.id(),
                    owner: caller(c),
                    kind,
                    client: Some(client),
                    providers: vec![provider],
                    cancelled: false,
                    reason: None,
                    callback: None,
                    slot_armed: false,
                    core_armed: false,
                    delivered: false,
                    posted: false,
                    cancel_completes: false,
                    finished: false,
                    final_result: None,
                    instances: VecDeque::new(),
                    closed: false,
                    callback_calls: 0,
                    registered_before_post: false,
                    cancelled_before_post: false,
                });
            }
            Op::Cancel {
                o,
                caller: c,
                reason,
            } => {
                let Some(o) = pick(&self.objs, o) else { return };
                let reason = REASONS[usize::from(reason) % 4];
                let Some(client) = self.objs[o].client.as_ref() else {
                    return;
                };
                let got = client.cancel(caller(c), reason);
                if caller(c) != self.objs[o].owner {
                    assert_eq!(got, Err(MiResult::ACCESS_DENIED));
                    return;
                }
                assert_eq!(got, Ok(()));
                self.predict_cancel(o, reason);
            }
            Op::OperationCancel {
                o,
                caller: c,
                reason,
            } => {
                let raw = u32::from(reason % 6);
                let (id, target) = match o {
                    OpSel::Started(i) => match pick(&self.objs, i) {
                        Some(i) => (self.objs[i].id, Some(i)),
                        None => return,
                    },
                    OpSel::Raw(raw) => (RequestId::from_u64(raw), None),
                };
                // The live operation with that id, if any.
                let target = target
                    .filter(|&i| self.objs[i].live())
                    .or_else(|| self.objs.iter().position(|x| x.live() && x.id == id));
                let got = self.session.operation_cancel(id, caller(c), raw);
                let Some(o) = target else {
                    assert_eq!(got, MiResult::INVALID_PARAMETER, "cancel of unknown id");
                    return;
                };
                if self.objs[o].closed || raw >= 4 {
                    assert_eq!(got, MiResult::INVALID_PARAMETER);
                } else if caller(c) != self.objs[o].owner {
                    assert_eq!(got, MiResult::ACCESS_DENIED);
                } else {
                    assert_eq!(got, MiResult::OK);
                    self.predict_cancel(o, REASONS[raw as usize]);
                }
            }
            Op::Close { o, caller: c } => {
                let Some(o) = pick(&self.objs, o) else { return };
                let Some(client) = self.objs[o].client.take() else {
                    return;
                };
                match client.close(caller(c)) {
                    Err((error, client)) => {
                        assert_ne!(caller(c), self.objs[o].owner);
                        assert_eq!(error, MiResult::ACCESS_DENIED);
                        self.objs[o].client = Some(client);
                    }
                    Ok(()) => {
                        assert_eq!(caller(c), self.objs[o].owner);
                        if self.objs[o].final_result.is_none() {
                            self.predict_cancel(o, MiCancellationReason::None);
                        }
                        self.objs[o].closed = true;
                        self.objs[o].instances.clear();
                    }
                }
            }
            Op::Register { o, clone } => {
                let Some(o) = pick(&self.objs, o) else { return };
                let Some(c) = pick(&self.objs[o].providers, clone) else {
                    return;
                };
                let tag = self.next_tag;
                self.next_tag += 1;
                let log = self.log.clone();
                let got = self.objs[o].providers[c]
                    .register_cancel_with(move |reason| log.lock().unwrap().push((o, tag, reason)));
                let obj = &mut self.objs[o];
                let expected = if obj.kind == MiOperationKind::Invoke {
                    Err(MiResult::NOT_SUPPORTED)
                } else if obj.posted {
                    Err(MiResult::INVALID_PARAMETER)
                } else if obj.delivered {
                    Ok(MiRegistration::AlreadyDelivered)
                } else {
                    obj.callback = Some(tag);
                    if !obj.cancelled {
                        obj.core_armed = true;
                        obj.slot_armed = true;
                        Ok(MiRegistration::Registered)
                    } else if obj.slot_armed {
                        Ok(MiRegistration::Registered)
                    } else {
                        obj.callback = None;
                        obj.delivered = true;
                        obj.cancel_completes = true;
                        let reason = self.reason(o);
                        self.set_final(o, MiFinalResult::cancelled(reason));
                        self.expected_calls.push((o, tag, reason));
                        self.finish_op(o);
                        Ok(MiRegistration::CalledAtOnce)
                    }
                };
                if matches!(
                    expected,
                    Ok(MiRegistration::Registered | MiRegistration::CalledAtOnce)
                ) {
                    self.objs[o].registered_before_post = true;
                }
                assert_eq!(got, expected, "register_cancel on {o}");
            }
            Op::PostInstance { o, clone, value } => {
                let Some(o) = pick(&self.objs, o) else { return };
                let Some(c) = pick(&self.objs[o].providers, clone) else {
                    return;
                };
                let got = self.objs[o].providers[c].post_instance(value);
                let obj = &mut self.objs[o];
                if obj.posted {
                    assert_eq!(got, Err(MiResult::INVALID_PARAMETER));
                } else if obj.final_result.is_some() {
                    assert_eq!(got, Err(MiResult::FAILED));
                } else {
                    assert_eq!(got, Ok(()));
                    obj.instances.push_back(value);
                }
            }
            Op::PostResult { o, clone, result } => {
                let Some(o) = pick(&self.objs, o) else { return };
                let Some(c) = pick(&self.objs[o].providers, clone) else {
                    return;
                };
                let result = RESULTS[usize::from(result) % 4];
                let provider = self.objs[o].providers.remove(c);
                let expected = self.predict_post(o, result);
                let got = provider.post_result(result);
                assert_eq!(got.ok(), expected, "post_result on {o}");
                if self.objs[o].providers.is_empty() {
                    // The last clone's drop posts FAILED: already posted, nothing happens.
                    assert_eq!(self.predict_post(o, MiResult::FAILED), None);
                }
            }
            Op::GetResult { o } => {
                let Some(o) = pick(&self.objs, o) else { return };
                let Some(client) = self.objs[o].client.as_ref() else {
                    return;
                };
                let got = client.get_result();
                let obj = &mut self.objs[o];
                let expected = match obj.instances.pop_front() {
                    Some(v) => MiDelivery::Instance(v),
                    None => match obj.final_result {
                        Some(f) => MiDelivery::Final(f),
                        None => MiDelivery::NotYet,
                    },
                };
                assert_eq!(got, expected, "get_result on {o}");
            }
            Op::CloneProvider { o } => {
                let Some(o) = pick(&self.objs, o) else { return };
                if let Some(p) = self.objs[o].providers.first() {
                    let p = p.clone();
                    self.objs[o].providers.push(p);
                }
            }
            Op::DropProvider { o, clone } => {
                let Some(o) = pick(&self.objs, o) else { return };
                let Some(c) = pick(&self.objs[o].providers, clone) else {
                    return;
                };
                self.drop_provider(o, c);
            }
            Op::Shutdown => {
                self.session.shutdown();
                self.shutdown = true;
            }
        }
        self.check(op);
    }

    fn check(&mut self, op: &Op) {
        assert_eq!(irql::current(), Irql::PASSIVE, "IRQL after {op:?}");
        assert_eq!(
            bugcheck::count(),
            0,
            "bug check after {op:?}: {:?}",
            bugcheck::recent()
        );
        let calls = std::mem::take(&mut *self.log.lock().unwrap());
        let expected = std::mem::take(&mut self.expected_calls);
        assert_eq!(calls, expected, "callbacks of {op:?}");
        for &(o, _, reason) in &calls {
            let obj = &mut self.objs[o];
            obj.callback_calls += 1;
            assert_eq!(obj.callback_calls, 1, "callback called twice for {o}");
            assert!(obj.cancelled, "callback of an operation not cancelled");
            assert!(!obj.posted, "callback after the provider's final result");
            assert_eq!(
                Some(reason),
                obj.reason,
                "callback with another reason than the first"
            );
        }
        assert_eq!(
            self.session.operations_in_use(),
            self.in_use(),
            "quota after {op:?}"
        );
        assert!(self.session.operations_in_use() <= self.quota);
        let live = self.objs.iter().filter(|o| o.live()).count();
        assert_eq!(
            self.session.live_operations(),
            live,
            "live operations after {op:?}"
        );
        for (i, obj) in self.objs.iter().enumerate() {
            if let Some(client) = &obj.client {
                assert_eq!(
                    client.final_result(),
                    obj.final_result,
                    "final result of {i}"
                );
                assert_eq!(client.is_cancelled(), obj.cancelled);
            }
            for p in &obj.providers {
                assert_eq!(p.is_cancelled(), obj.cancelled);
                let reason = obj
                    .cancelled
                    .then(|| obj.reason.unwrap_or(MiCancellationReason::None));
                assert_eq!(p.cancellation_reason(), reason);
            }
        }
    }

    fn finish(mut self) {
        for o in 0..self.objs.len() {
            while !self.objs[o].providers.is_empty() {
                self.step(&Op::DropProvider {
                    o: o as u8,
                    clone: 0,
                });
            }
            if self.objs[o].client.is_some() {
                let owner = self.objs[o].owner.0 as u8;
                self.step(&Op::Close {
                    o: o as u8,
                    caller: owner,
                });
            }
        }
        assert_eq!(
            self.session.operations_in_use(),
            0,
            "quota not back to zero"
        );
        assert_eq!(self.session.live_operations(), 0, "operations leaked");
        for (i, obj) in self.objs.iter().enumerate() {
            assert!(obj.finished, "operation {i} never finished");
            assert!(obj.posted, "operation {i}'s provider never posted");
            if obj.cancelled_before_post && obj.registered_before_post {
                assert_eq!(
                    obj.callback_calls, 1,
                    "a cancel of {i} never reached its callback"
                );
            }
        }
    }
}

/// Runs one input: decodes it and checks every call and the end state. Panics on a violation.
pub fn run(data: &[u8]) {
    bugcheck::set_policy(BugCheckPolicy::Record);
    bugcheck::clear();
    let (quota, ops) = decode(data);
    let mut harness = Harness {
        session: MiSession::new(quota),
        quota,
        objs: Vec::new(),
        shutdown: false,
        log: Log::default(),
        next_tag: 0,
        expected_calls: Vec::new(),
    };
    for op in &ops {
        harness.step(op);
    }
    harness.finish();
}
