//! QEMU's job state machine (`job.c`): the states, the transition table
//! `JobSTT` and the verb table `JobVerbTable`, as pure data.
//!
//! The tables are copied from QEMU 10.0 row for row, so a management tool
//! that knows which verb QEMU accepts in which state gets the same answers
//! here, and the same error text ("Job 'x' in state 'y' cannot accept
//! command verb 'z'").

use super::super::qmp::QmpError;

/// `JobStatus` in `qapi/job.json`, in QEMU's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl JobStatus {
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// `JobVerb` in `qapi/job.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobVerb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
    Change,
}

impl JobVerb {
    pub const ALL: [JobVerb; 8] = [
        JobVerb::Cancel,
        JobVerb::Pause,
        JobVerb::Resume,
        JobVerb::SetSpeed,
        JobVerb::Complete,
        JobVerb::Finalize,
        JobVerb::Dismiss,
        JobVerb::Change,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }
}

/// `JobSTT` from QEMU's `job.c`: `STT[from][to]`.
#[rustfmt::skip]
const STT: [[bool; 11]; 11] = {
    const O: bool = false;
    const I: bool = true;
    [
        //             U  C  R  P  Y  S  W  D  X  E  N
        /* U: */      [O, I, O, O, O, O, O, O, O, O, O],
        /* C: */      [O, O, I, O, O, O, O, O, I, O, I],
        /* R: */      [O, O, O, I, I, O, I, O, I, O, O],
        /* P: */      [O, O, I, O, O, O, O, O, O, O, O],
        /* Y: */      [O, O, O, O, O, I, I, O, I, O, O],
        /* S: */      [O, O, O, O, I, O, O, O, O, O, O],
        /* W: */      [O, O, O, O, O, O, O, I, I, O, O],
        /* D: */      [O, O, O, O, O, O, O, O, I, I, O],
        /* X: */      [O, O, O, O, O, O, O, O, I, I, O],
        /* E: */      [O, O, O, O, O, O, O, O, O, O, I],
        /* N: */      [O, O, O, O, O, O, O, O, O, O, O],
    ]
};

/// `JobVerbTable` from QEMU 10.0's `job.c`: `VERBS[verb][state]`.
#[rustfmt::skip]
const VERBS: [[bool; 11]; 8] = {
    const O: bool = false;
    const I: bool = true;
    [
        //                U  C  R  P  Y  S  W  D  X  E  N
        /* cancel */     [O, I, I, I, I, I, I, I, O, O, O],
        /* pause */      [O, I, I, I, I, I, O, O, O, O, O],
        /* resume */     [O, I, I, I, I, I, O, O, O, O, O],
        /* set-speed */  [O, I, I, I, I, I, O, O, O, O, O],
        /* complete */   [O, O, O, O, I, I, O, O, O, O, O],
        /* finalize */   [O, O, O, O, O, O, O, I, O, O, O],
        /* dismiss */    [O, O, O, O, O, O, O, O, O, I, O],
        /* change */     [O, I, I, I, I, I, O, O, O, O, O],
    ]
};

/// Whether a job may go from `from` to `to`. QEMU also allows staying in
/// the same state (a no-op); so does this.
pub fn can_transition(from: JobStatus, to: JobStatus) -> bool {
    from == to || STT[from.index()][to.index()]
}

/// Whether `verb` is accepted in `state`.
pub fn verb_allowed(verb: JobVerb, state: JobStatus) -> bool {
    VERBS[verb as usize][state.index()]
}

/// QEMU's `job_apply_verb_locked`: the error a refused verb gets.
pub fn apply_verb(id: &str, verb: JobVerb, state: JobStatus) -> Result<(), QmpError> {
    if verb_allowed(verb, state) {
        Ok(())
    } else {
        Err(QmpError::generic(format!(
            "Job '{id}' in state '{}' cannot accept command verb '{}'",
            state.as_str(),
            verb.as_str()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::JobVerb::*;
    use super::*;

    /// Every allowed transition, spelled out (the rest must be refused).
    const ALLOWED: &[(JobStatus, JobStatus)] = &[
        (Undefined, Created),
        (Created, Running),
        (Created, Aborting),
        (Created, Null),
        (Running, Paused),
        (Running, Ready),
        (Running, Waiting),
        (Running, Aborting),
        (Paused, Running),
        (Ready, Standby),
        (Ready, Waiting),
        (Ready, Aborting),
        (Standby, Ready),
        (Waiting, Pending),
        (Waiting, Aborting),
        (Pending, Aborting),
        (Pending, Concluded),
        (Aborting, Concluded),
        (Concluded, Null),
    ];

    #[test]
    fn every_transition_matches_qemu_job_stt() {
        for from in JobStatus::ALL {
            for to in JobStatus::ALL {
                let want = from == to || ALLOWED.contains(&(from, to));
                assert_eq!(
                    can_transition(from, to),
                    want,
                    "{} -> {}",
                    from.as_str(),
                    to.as_str()
                );
            }
        }
    }

    #[test]
    fn null_is_terminal_and_concluded_only_goes_to_null() {
        for to in JobStatus::ALL {
            assert_eq!(can_transition(Null, to), to == Null);
            assert_eq!(
                can_transition(Concluded, to),
                matches!(to, Concluded | Null)
            );
        }
    }

    #[test]
    fn a_paused_job_cannot_abort_without_running_first() {
        assert!(!can_transition(Paused, Aborting));
        assert!(can_transition(Paused, Running) && can_transition(Running, Aborting));
    }

    #[test]
    fn every_verb_matches_qemu_job_verb_table() {
        let allowed = |v: JobVerb| -> &'static [JobStatus] {
            match v {
                Cancel => &[Created, Running, Paused, Ready, Standby, Waiting, Pending],
                Pause | Resume | SetSpeed | Change => &[Created, Running, Paused, Ready, Standby],
                Complete => &[Ready, Standby],
                Finalize => &[Pending],
                Dismiss => &[Concluded],
            }
        };
        for verb in JobVerb::ALL {
            for st in JobStatus::ALL {
                let want = allowed(verb).contains(&st);
                assert_eq!(
                    verb_allowed(verb, st),
                    want,
                    "{} in {}",
                    verb.as_str(),
                    st.as_str()
                );
                assert_eq!(apply_verb("j", verb, st).is_ok(), want);
            }
        }
    }

    #[test]
    fn refused_verb_error_names_job_state_and_verb() {
        let e = apply_verb("job0", Dismiss, Running).unwrap_err();
        assert_eq!(
            e.desc,
            "Job 'job0' in state 'running' cannot accept command verb 'dismiss'"
        );
    }
}
