//! A RabbitMQ user of one test, made with `rabbitmqctl` on the local node
//! (unique name, random password with characters a URL must escape) and
//! deleted on drop whatever happened.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{cannot_run, TestEnv};

/// `rabbitmqctl` starts an Erlang VM per call: seconds on a busy machine.
const RABBITMQCTL_TIMEOUT: Duration = Duration::from_secs(90);

/// `rabbitmqctl <args>`, killed after `RABBITMQCTL_TIMEOUT`. Err: why it failed.
/// On a test's runtime the wait does not hold up the other tasks (the
/// relay's consumers, the harness's AMQP connection).
pub fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| run_rabbitmqctl(args))
        }
        _ => run_rabbitmqctl(args),
    }
}

fn run_rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let started = Command::new("rabbitmqctl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = started.map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
    let deadline = Instant::now() + RABBITMQCTL_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "rabbitmqctl {args:?} did not finish within {RABBITMQCTL_TIMEOUT:?}"
                ));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("rabbitmqctl {args:?}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "rabbitmqctl {args:?} exited with {}: {}{}",
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The vhost an AMQP URL names, as lapin reads it (`/` for an empty path or `%2f`).
pub fn vhost_of(url: &str) -> String {
    url.parse::<lapin::uri::AMQPUri>()
        .expect("the test AMQP URL parses")
        .vhost
}

/// `name` as a regular expression that matches exactly it.
pub fn regex_literal(name: &str) -> String {
    name.chars()
        .flat_map(|c| {
            let escape = r"\.+*?()|[]{}^$".contains(c);
            escape.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// `^(amq\.default|x|y)$`: write on exactly these exchanges.
pub fn write_on(exchanges: &[&str]) -> String {
    let names: Vec<String> = exchanges.iter().map(|x| regex_literal(x)).collect();
    format!("^({})$", names.join("|"))
}

/// A RabbitMQ user of one test, deleted (with its permissions) on drop.
pub struct BrokerUser {
    pub name: String,
    pub password: String,
    pub vhost: String,
    /// The test's AMQP URL, whose host, port and vhost the user's URL keeps.
    base_url: String,
}

impl BrokerUser {
    /// A user with no tags and exactly `configure`, `write`, `read` on the
    /// test broker's vhost. None (after printing SKIPPED) when users cannot be
    /// managed here.
    pub fn create(
        env: &TestEnv,
        test: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Option<BrokerUser> {
        let url = url::Url::parse(&env.amqp_url).expect("the test AMQP URL parses");
        let local = matches!(
            url.host_str(),
            Some("127.0.0.1" | "localhost" | "[::1]" | "::1")
        );
        if !local {
            cannot_run(
                test,
                &format!(
                    "the test broker ({}) is not on this machine, and rabbitmqctl manages users of the local node only",
                    url.host_str().unwrap_or("?")
                ),
            );
            return None;
        }
        if let Err(e) = rabbitmqctl(&["-q", "list_vhosts"]) {
            cannot_run(test, &format!("rabbitmqctl is not usable here ({e})"));
            return None;
        }
        // Characters a URL must escape: the test proves the encoding works.
        let password = format!("p@ss:w/rd%#?{:016x}", rand::random::<u64>());
        let user = BrokerUser {
            name: format!("outbox-relay-test-{}", env.schema),
            password,
            vhost: vhost_of(&env.amqp_url),
            base_url: env.amqp_url.clone(),
        };
        // From here on the user exists (or may): Drop deletes it.
        rabbitmqctl(&["add_user", &user.name, &user.password])
            .unwrap_or_else(|e| panic!("create RabbitMQ user {}: {e}", user.name));
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &user.vhost,
            &user.name,
            configure,
            write,
            read,
        ])
        .unwrap_or_else(|e| panic!("set permissions of {}: {e}", user.name));
        let users = rabbitmqctl(&["-q", "list_users"])
            .unwrap_or_else(|e| panic!("list RabbitMQ users: {e}"));
        let tags = users
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{}\t", user.name)))
            .unwrap_or_else(|| panic!("user {} not listed:\n{users}", user.name));
        assert_eq!(tags.trim(), "[]", "user {} has tags", user.name);
        println!(
            "RabbitMQ user {} on vhost '{}': configure {configure:?} write {write:?} read {read:?}, no tags",
            user.name, user.vhost
        );
        Some(user)
    }

    /// A user who may write on exactly `exchanges` and nothing else.
    pub fn publish_only(env: &TestEnv, test: &str, exchanges: &[&str]) -> Option<BrokerUser> {
        BrokerUser::create(env, test, "^$", &write_on(exchanges), "^$")
    }

    /// The test's AMQP URL logging in as this user (name and password
    /// percent-encoded).
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&self.base_url).expect("the test AMQP URL parses");
        url.set_username(&self.name).expect("set the URL's user");
        url.set_password(Some(&self.password))
            .expect("set the URL's password");
        url.to_string()
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        // Whatever happened: the shared broker is left as it was found.
        if let Err(e) = rabbitmqctl(&["delete_user", &self.name]) {
            eprintln!(
                "could not delete RabbitMQ user {}: {e}; delete it by hand",
                self.name
            );
        }
    }
}
