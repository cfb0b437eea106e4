//! A second completion of a request under `BugCheckPolicy::Record`: `complete_request` returns
//! `STATUS_INVALID_DEVICE_STATE`, the `MULTIPLE_IRP_COMPLETE_REQUESTS` (0x44) bug check is recorded
//! with parameters `[serial number, first status, second status, 0]`, and the first status and
//! information stay. (Under the default `Panic` policy the same second completion panics; see
//! `tests/lifecycle.rs`.)
//!
//! The policy, the counter and the ring are process-wide, and the tests of one file run on
//! parallel threads, so every test here holds `common::exclusive`'s guard for its whole run,
//! as `tests/bugcheck_record.rs` does.

#![cfg(feature = "std")]

use rdbss::bugcheck::{self, BugCheck, BugCheckCode, BugCheckPolicy};
use rdbss::{
    BlockedQueue, BlockedState, CancelOutcome, ContextInit, MajorFunction, ManualWorkQueue,
    NtStatus, Rdbss, RxContext,
};

mod common;
use common::exclusive;

/// The only recorded bug check, checked against `code` and `parameters`.
#[track_caller]
fn assert_single(code: BugCheckCode, parameters: [usize; 4]) -> BugCheck {
    assert_eq!(bugcheck::count(), 1, "recent: {:?}", bugcheck::recent());
    let recent = bugcheck::recent();
    assert_eq!(recent.len(), 1, "{recent:?}");
    assert_eq!(recent[0].code, code, "{recent:?}");
    assert_eq!(recent[0].parameters, parameters, "{recent:?}");
    recent[0]
}

fn instance() -> Rdbss<()> {
    Rdbss::with_work_queue(ManualWorkQueue::new())
}

fn read() -> ContextInit {
    ContextInit {
        major_function: MajorFunction::READ,
        ..ContextInit::default()
    }
}

const FIRST: NtStatus = NtStatus::END_OF_FILE;
const SECOND: NtStatus = NtStatus::CANCELLED;

#[test]
fn second_complete_request_under_record_is_recorded_as_0x44_and_keeps_the_first_result() {
    let _x = exclusive(BugCheckPolicy::Record);
    let rdbss = instance();
    let ctx = rdbss.create_context(read(), ()).unwrap();
    let serial = ctx.serial_number();
    let observer = ctx.clone();
    let second = ctx.clone();
    assert_eq!(observer.reference_count(), 3);

    assert_eq!(ctx.complete_request(FIRST, 100), Ok(()));
    assert_eq!(bugcheck::count(), 0);
    assert_eq!(
        second.complete_request(SECOND, 7),
        Err(NtStatus::INVALID_DEVICE_STATE)
    );

    let bc = assert_single(
        BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS,
        [
            serial as usize,
            FIRST.code() as usize,
            SECOND.code() as usize,
            0,
        ],
    );
    assert_eq!(bc.code.0, 0x44);
    assert!(
        bc.to_string()
            .contains("MULTIPLE_IRP_COMPLETE_REQUESTS (0x00000044)"),
        "{bc}"
    );
    // The first completion stands.
    assert!(observer.is_completed());
    assert_eq!(observer.stored_status(), FIRST);
    assert_eq!(observer.information(), 100);
    // The failed completion still dropped its handle's reference.
    assert_eq!(observer.reference_count(), 1);
    drop(observer);
    assert_eq!(rdbss.active_contexts(), 0);
}

#[test]
fn second_complete_by_id_under_record_is_invalid_device_state_and_recorded() {
    let _x = exclusive(BugCheckPolicy::Record);
    let rdbss = instance();
    let ctx = rdbss.create_context(read(), ()).unwrap();
    let id = ctx.id();
    assert_eq!(rdbss.complete_by_id(id, NtStatus::SUCCESS, 1), Ok(()));
    assert_eq!(
        rdbss.complete_by_id(id, SECOND, 2),
        Err(NtStatus::INVALID_DEVICE_STATE)
    );
    assert_single(
        BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS,
        [
            ctx.serial_number() as usize,
            NtStatus::SUCCESS.code() as usize,
            SECOND.code() as usize,
            0,
        ],
    );
    assert_eq!(ctx.stored_status(), NtStatus::SUCCESS);
    assert_eq!(ctx.information(), 1);
    assert_eq!(
        ctx.reference_count(),
        1,
        "both lookups' references were dropped"
    );
}

#[test]
fn standalone_rxcontext_second_complete_request_under_record_keeps_the_first_result() {
    let _x = exclusive(BugCheckPolicy::Record);
    let ctx = RxContext::try_new(
        ContextInit {
            serial_number: 31,
            ..read()
        },
        (),
    )
    .unwrap();
    assert_eq!(ctx.complete_request(FIRST, 5), Ok(()));
    assert_eq!(
        ctx.complete_request(SECOND, 6),
        Err(NtStatus::INVALID_DEVICE_STATE)
    );
    assert_single(
        BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS,
        [31, FIRST.code() as usize, SECOND.code() as usize, 0],
    );
    assert!(ctx.is_completed());
    assert_eq!(ctx.stored_status(), FIRST);
    assert_eq!(ctx.information(), 5);
}

#[test]
fn cancelling_a_blocked_operation_its_owner_already_completed_is_recorded_as_0x44() {
    let _x = exclusive(BugCheckPolicy::Record);
    let rdbss = instance();
    let pipe = BlockedQueue::new();
    let ctx = rdbss.create_context(read(), ()).unwrap();
    pipe.enqueue(&ctx).unwrap();
    // The owner (wrongly) completes the operation while it still waits in the queue.
    RxContext::complete_request(&ctx, FIRST, 9).unwrap();
    // The cancel unlinks it and completes it with STATUS_CANCELLED: a second completion.
    assert_eq!(ctx.cancel(), CancelOutcome::BlockedOperationCancelled);
    assert_single(
        BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS,
        [
            ctx.serial_number() as usize,
            FIRST.code() as usize,
            NtStatus::CANCELLED.code() as usize,
            0,
        ],
    );
    assert!(pipe.is_empty());
    assert_eq!(ctx.blocked_state(), BlockedState::Cancelled);
    assert_eq!(ctx.stored_status(), FIRST, "the first completion stands");
    assert_eq!(ctx.information(), 9);
    assert_eq!(
        ctx.reference_count(),
        1,
        "the queue's reference was dropped"
    );
}

#[test]
fn a_correct_lifecycle_under_record_records_nothing() {
    let _x = exclusive(BugCheckPolicy::Record);
    let rdbss = instance();
    let pipe = BlockedQueue::new();
    for i in 0..8_usize {
        let mut ctx = rdbss.create_context(read(), ()).unwrap();
        pipe.enqueue(&ctx).unwrap();
        if i % 2 == 0 {
            assert_eq!(ctx.cancel(), CancelOutcome::BlockedOperationCancelled);
        } else {
            drop(pipe.resume_blocked_operations_serially().unwrap());
            ctx.reinitialize().unwrap();
            let id = ctx.id();
            assert_eq!(ctx.clone().into_id(), id);
            assert!(rdbss.dereference_by_id(id).is_ok());
            ctx.complete_request(NtStatus::SUCCESS, i).unwrap();
        }
    }
    assert_eq!(bugcheck::count(), 0, "{:?}", bugcheck::recent());
    assert_eq!(rdbss.active_contexts(), 0);
}
