//! `--allreduce ring`: the workers sum their gradients among themselves, through shared memory
//! on one host or over TCP. The same promises as with the parameter server: every sample of
//! every epoch trained once, the accuracy of a fault-free run, whatever happens to the workers
//! or the coordinator.

use crate::faults::{
    assert_joined, assert_lost, check_job, coordinator_sigkilled_and_resumed, lost_line,
    same_bytes, seconds, wait_admitted, wait_step,
};
use crate::procs::{Job, Procs, WAIT, baseline, epoch_checkpoint, metrics};
use crate::support::init_logging;
use libc::{SIGCONT, SIGKILL, SIGSTOP};
use tracing::info;

/// Keeps detection of silent workers (and the ring's own timeout) short.
const FLAGS: &[&str] = &["--worker-timeout", "2"];

/// Mid-epoch 1 of 470 steps (4 workers, 2 epochs).
const FAULT_STEP: u64 = 150;

#[test]
fn ring_training_matches_the_parameter_server() -> anyhow::Result<()> {
    init_logging();
    let ps = baseline(&Job::mlp(4, 2));
    let ring = baseline(&Job::mlp(4, 2).ring());
    println!(
        "test accuracy: parameter server {:.4}, ring {:.4}",
        ps.test_accuracy, ring.test_accuracy
    );
    // The sums run in another order, so the bits differ; the training must not.
    assert!(
        (ps.test_accuracy - ring.test_accuracy).abs() <= 0.005,
        "ps {} ring {}",
        ps.test_accuracy,
        ring.test_accuracy
    );
    for record in metrics(&ring.run_dir) {
        assert_eq!(record["samples"], 60_000, "{record}");
        let (train, comm) = (
            record["train_seconds"].as_f64().unwrap(),
            record["comm_seconds"].as_f64().unwrap(),
        );
        assert!(comm > 0.0 && comm < train, "{record}");
        println!(
            "epoch {}: {:.0} images/s, communication {:.1}% of the training time",
            record["epoch"],
            record["images_per_sec"],
            100.0 * comm / train
        );
    }
    Ok(())
}

/// The transport does not change the sums: workers kept on TCP by `--ring-shared-memory
/// false` train the same bits as the fault-free run, whose workers summed in shared memory.
#[test]
fn a_ring_over_tcp_trains_the_bits_of_a_ring_in_shared_memory() -> anyhow::Result<()> {
    init_logging();
    let job = Job::mlp(2, 1).ring();
    let in_shared_memory = baseline(&job);
    let dir = tempfile::tempdir()?;
    let mut procs = Procs::new();
    let flags = ["--ring-shared-memory", "false"];
    let cluster = procs.cluster(&job, &dir.path().join("run"), &[], &flags);
    for worker in &cluster.workers {
        let connected = worker.log.wait_for("ring connected");
        assert!(
            connected.text.contains(
                "summing over TCP (no shared memory: rank 0: shared memory is turned off)"
            ),
            "{}",
            connected.text
        );
    }
    let formed = cluster.coordinator.log.wait_for("ring formed");
    assert!(
        formed.text.contains("transport=TCP (no shared memory"),
        "{}",
        formed.text
    );
    let status = procs.wait_exit(&cluster.coordinator, WAIT);
    assert!(status.success(), "coordinator: {status}");
    assert!(
        same_bytes(
            &epoch_checkpoint(&cluster.run_dir, 1),
            &epoch_checkpoint(&in_shared_memory.run_dir, 1)
        ),
        "the parameters differ from the shared-memory run's ({})",
        in_shared_memory.run_dir.display()
    );
    Ok(())
}

#[test]
fn ring_worker_killed_then_stopped_the_ring_is_rebuilt_each_time() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let job = Job::mlp(4, 2).ring();
    baseline(&job);
    let mut procs = Procs::new();
    let cluster = procs.cluster(&job, &dir.path().join("run"), FLAGS, &[]);
    let log = &cluster.coordinator.log;
    // Workers of one host: the kill and the stop below hit a ring in shared memory.
    let formed = log.wait_for("ring formed");
    assert!(
        formed.text.contains("transport=shared memory (up to "),
        "{}",
        formed.text
    );
    for worker in &cluster.workers {
        let connected = worker.log.wait_for("ring connected");
        assert!(
            connected.text.contains("summing over shared memory"),
            "{}",
            connected.text
        );
    }

    info!("--- SIGKILL a worker after step {FAULT_STEP}");
    let killed_worker = cluster.workers[1].clone();
    let killed_id = cluster.worker_id(&killed_worker);
    wait_step(log, FAULT_STEP);
    let killed = procs.signal(&killed_worker, SIGKILL);
    let lost = lost_line(log, &killed_id);
    seconds("detection", killed, lost.at);
    let rebuilt = log.wait_for_after(&lost, "ring formed");
    assert!(rebuilt.text.contains("workers=3"), "{}", rebuilt.text);
    seconds("new ring of 3", killed, rebuilt.at);

    info!("--- SIGSTOP another: evicted as silent, the others time out of the ring");
    let stopped_worker = cluster.workers[2].clone();
    let stopped_id = cluster.worker_id(&stopped_worker);
    let stopped = procs.signal(&stopped_worker, SIGSTOP);
    let lost = lost_line(log, &stopped_id);
    seconds("detection", stopped, lost.at);
    let rebuilt = log.wait_for_after(&lost, "ring formed");
    assert!(rebuilt.text.contains("workers=2"), "{}", rebuilt.text);
    seconds("new ring of 2", stopped, rebuilt.at);

    info!("--- SIGCONT: it registers again and joins a ring of 3");
    let from = lost.index;
    let continued = procs.signal(&stopped_worker, SIGCONT);
    let new_id = {
        let again = stopped_worker.log.wait_for("registering again");
        assert!(
            again.text.contains("evicted by the coordinator"),
            "{}",
            again.text
        );
        let registered = stopped_worker
            .log
            .wait_for_after(&again, "registered worker=");
        crate::procs::field(&registered.text, "worker")
            .expect("worker field")
            .to_owned()
    };
    let admitted = wait_admitted(log, from, &new_id);
    let rebuilt = log.wait_for_after(&admitted, "ring formed");
    assert!(rebuilt.text.contains("workers=3"), "{}", rebuilt.text);
    seconds("back in a ring of 3 after SIGCONT", continued, rebuilt.at);

    info!("--- the job finishes");
    let records = check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    assert_lost(&records, &[&killed_id, &stopped_id]);
    assert_joined(&records, &new_id);
    Ok(())
}

#[test]
fn ring_coordinator_sigkilled_and_resumed_ends_with_the_parameters_of_an_uninterrupted_run()
-> anyhow::Result<()> {
    coordinator_sigkilled_and_resumed(Job::mlp(2, 2).ring())
}

#[test]
fn workers_that_cannot_reach_each_other_stop_the_job_with_the_reason() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let job = Job::mlp(2, 1).ring();
    let mut procs = Procs::new();
    let addr = crate::procs::free_addr();
    let url = format!("http://{addr}");
    let coordinator =
        procs.external_coordinator("coordinator", &job, addr, &dir.path().join("run"), FLAGS);
    procs.worker("worker#0", &url, &["--ring-listen", "127.0.0.1:0"]);
    let unreachable = ["--ring-host", "no-such-host.invalid"];
    procs.worker("worker#1", &url, &unreachable);

    info!("--- every ring set-up fails with both workers present: the job stops, naming why");
    let status = procs.wait_exit(&coordinator, crate::procs::WAIT);
    let log = coordinator.log.tail(40);
    assert_eq!(status.code(), Some(1), "not resumable: {status}\n{log}");
    assert!(log.contains("failed 5 times in a row"), "{log}");
    assert!(
        log.contains("cannot resolve ring peer 'no-such-host.invalid:"),
        "{log}"
    );
    assert!(
        !log.contains("lost at step"),
        "nobody is evicted for it:\n{log}"
    );
    Ok(())
}

/// `--allreduce nccl` in a build without the `nccl` feature (CI's): a worker that cannot sum
/// with NCCL is refused at registration and stops with the reason, the coordinator keeps
/// waiting for able workers, and a coordinator that would spawn such workers refuses to start.
/// (NCCL itself needs a CUDA device: see README, "NCCL".)
#[test]
fn nccl_jobs_refuse_workers_that_cannot_sum_with_nccl() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let job = Job {
        allreduce: "nccl",
        ..Job::mlp(1, 1)
    };
    let mut procs = Procs::new();
    let cluster = procs.cluster(&job, &dir.path().join("run"), &[], &[]);
    let worker = &cluster.workers[0];
    let status = procs.wait_exit(worker, std::time::Duration::from_secs(60));
    assert!(!status.success(), "{status}");
    worker.log.wait_for("build it with --features nccl");
    cluster.coordinator.log.wait_for("registration refused");
    assert!(procs.is_running(&cluster.coordinator));
    procs.signal(&cluster.coordinator, libc::SIGTERM);
    procs.wait_exit(&cluster.coordinator, std::time::Duration::from_secs(30));

    let spawning = procs.coordinator(
        "spawning",
        &["--workers", "1", "--allreduce", "nccl", "--run-dir"]
            .map(std::ffi::OsString::from)
            .into_iter()
            .chain([dir.path().join("spawned").into_os_string()])
            .collect::<Vec<_>>(),
    );
    let status = procs.wait_exit(&spawning, std::time::Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "a usage error: {status}");
    spawning.log.wait_for("built without NCCL");
    Ok(())
}
