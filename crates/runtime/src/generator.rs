//! A generator replica: one decode thread serving several streams (continuous batching); the
//! tokens of each stream are pushed to the caller's inbox as they are decoded (or, for a caller
//! without one, read by long polling).
use std::sync::atomic::AtomicUsize;
use std::sync::{mpsc, Arc};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ragfleet_client::{groups, RoleMsg};
use ragfleet_proto::{Request, Response, Role, WireError};

use crate::call::{common, info, reply, unsupported};
use crate::models::{GenEvent, GenerateModel};
use crate::streams::{next_response, StreamTable};
use ragfleet_proto::GenerationRequest;

type Job = (
    GenerationRequest,
    tokio::sync::mpsc::UnboundedSender<GenEvent>,
);

/// Start arguments.
#[derive(Clone)]
pub struct GeneratorArgs {
    /// Node name.
    pub node: String,
    /// The model.
    pub model: Arc<dyn GenerateModel>,
    /// Streams decoded together.
    pub max_streams: usize,
    /// Answers that may wait for a free stream; past `max_streams + max_queue` a request is
    /// refused at once as overloaded.
    pub max_queue: usize,
    /// Longest accepted answer.
    pub max_tokens: u32,
}

/// The generator actor.
#[derive(Debug, Default, Clone)]
pub struct GeneratorActor;

/// Its state.
pub struct GeneratorState {
    args: GeneratorArgs,
    jobs: mpsc::Sender<Job>,
    streams: Arc<StreamTable>,
    /// Answers decoding or waiting.
    active: Arc<AtomicUsize>,
}

impl Actor for GeneratorActor {
    type Msg = RoleMsg;
    type State = GeneratorState;
    type Arguments = GeneratorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RoleMsg>,
        args: GeneratorArgs,
    ) -> Result<GeneratorState, ActorProcessingErr> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (model, n) = (args.model.clone(), args.max_streams);
        std::thread::Builder::new()
            .name("generator".into())
            .spawn(move || {
                // decoding keeps the kernel's default slice (see the embedder's thread)
                ragfleet_index::priority::default_slice();
                model.serve(rx, n)
            })?;
        ractor::pg::join(groups::GENERATORS.to_string(), vec![myself.get_cell()]);
        Ok(GeneratorState {
            args,
            jobs: tx,
            streams: Arc::new(StreamTable::default()),
            active: Arc::default(),
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<RoleMsg>,
        msg: RoleMsg,
        state: &mut GeneratorState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((req, port)) =
            common(msg, "generator", || info(&state.args.node, Role::Generator)).await
        else {
            return Ok(());
        };
        match req {
            Request::Generate(mut job) => {
                if job.user.trim().is_empty() {
                    reply(
                        port,
                        Response::Error(WireError::BadRequest("empty prompt".into())),
                    );
                    return Ok(());
                }
                let bound = state.args.max_streams + state.args.max_queue;
                let Ok(active) = crate::bound::take(&state.active, 1, bound) else {
                    let e = format!(
                        "generator busy: {bound} answers decoding or queued (generator.max_streams + generator.max_queue)"
                    );
                    reply(port, Response::Error(WireError::Overloaded(e)));
                    return Ok(());
                };
                // pushed to the caller's inbox as they come when it has one, else polled
                let (id, writer) = state.streams.open_to(job.push_to.take());
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                job.max_tokens = job.max_tokens.clamp(1, state.args.max_tokens.max(1));
                if state.jobs.send((job, tx)).is_err() {
                    reply(
                        port,
                        Response::Error(WireError::Unavailable("decode thread stopped".into())),
                    );
                    return Ok(());
                }
                let serving = crate::metrics::get().serving("generator");
                tokio::spawn(async move {
                    let _serving = (serving, active);
                    while let Some(ev) = rx.recv().await {
                        if writer.is_cancelled() {
                            // dropping the receiver stops the decode loop for this stream
                            return;
                        }
                        match ev {
                            GenEvent::Text(t) => writer.push(&t, 1),
                            GenEvent::Done(reason) => {
                                writer.finish_end(reason);
                                return;
                            }
                            GenEvent::Error(e) => {
                                writer.fail(e);
                                return;
                            }
                        }
                    }
                    writer.fail("generation stopped".into());
                });
                reply(port, Response::StreamStarted { stream: id });
            }
            Request::Cancel { stream } => {
                state.streams.cancel(stream);
                reply(port, Response::Ack);
            }
            Request::StreamNext { stream, wait_ms } => {
                let streams = state.streams.clone();
                tokio::spawn(
                    async move { reply(port, next_response(&streams, stream, wait_ms).await) },
                );
            }
            other => reply(port, unsupported(&other, "generator")),
        }
        Ok(())
    }
}
