//! Opening the session cookie: `session::Keyring::open` (the sealed format), the ticket inside it
//! and the session record it points to (`Sessions::load`, `Sessions::list_for_sub`), against one
//! real session in a memory store. The first input byte picks a mode:
//!
//! - 0: the rest is a cookie value. Only the two genuine cookies may open; whatever opens re-seals
//!   to a value that opens to the same ticket and session.
//! - 1: the rest is a plaintext sealed with the real key ring: it loads a session exactly when it
//!   is the real ticket.
//! - 2: byte edits (position, xor) of a genuine cookie: any change makes it refused.
//! - 3: byte edits of the stored record (or a record of the input's bytes): a record that still
//!   loads holds the original session; listings show only the original metadata.
use std::sync::LazyLock;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;
use vestibule::session::seal::MAX_PLAINTEXT_LEN;
use vestibule::session::{Keyring, MemoryStore, Session, SessionSettings, Sessions, Store};

const NAME: &str = "__Host-vestibule";
const NOW: u64 = 1_700_000_000;
const CURRENT: [u8; 32] = [0x11; 32];
const OLD: [u8; 32] = [0x22; 32];

struct World {
    runtime: Runtime,
    sessions: Sessions,
    store: Store,
    ring: Keyring,
    session: Session,
    /// Sealed with the current key, and the same ticket sealed with the old key.
    cookies: [String; 2],
    ticket: Vec<u8>,
    handle: String,
    record_name: String,
    record: Vec<u8>,
}

fn ring() -> Keyring {
    match Keyring::new(vec![CURRENT, OLD]) {
        Ok(ring) => ring,
        Err(e) => panic!("key ring: {e}"),
    }
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => panic!("runtime: {e}"),
    };
    let store = Store::Memory(MemoryStore::new(1000));
    let sessions = Sessions::new(SessionSettings::new(NAME, ring()), store.clone());
    let session = Session {
        sub: "alice".to_owned(),
        sid: Some("sid-1".to_owned()),
        user_agent: Some("fuzz".to_owned()),
        ..Session::default()
    };
    let (cookie, loaded) = match runtime.block_on(sessions.create(session, NOW)) {
        Ok(created) => created,
        Err(e) => panic!("create: {e}"),
    };
    let ring = ring();
    let ticket = match ring.open(NAME, &cookie) {
        Some(opened) => opened.plaintext,
        None => panic!("the new cookie does not open"),
    };
    let old = match Keyring::new(vec![OLD]).map(|old| old.seal(NAME, &ticket)) {
        Ok(Ok(sealed)) => sealed,
        _ => panic!("sealing with the old key failed"),
    };
    // The store name of a session: "s:" + hex(SHA-256(session id)), the id being the ticket's
    // first half (session/manager/ticket.rs). Checked here so a format change fails loudly.
    let record_name = format!("s:{}", hex::encode(Sha256::digest(&ticket[..32])));
    let record = match runtime.block_on(store.get(&record_name)) {
        Ok(Some(record)) => record.value,
        _ => panic!("no record under the derived store name"),
    };
    World {
        runtime,
        sessions,
        store,
        ring,
        session: Session::clone(&loaded.session),
        cookies: [cookie, old],
        ticket,
        handle: loaded.handle.to_string(),
        record_name,
        record,
    }
});

/// Loads `cookie`; if a session comes back it must be the real one, and its re-sealed cookie
/// must load it again without asking for another re-seal.
fn load(world: &World, cookie: &str) -> bool {
    let loaded = match world.runtime.block_on(world.sessions.load(cookie, NOW)) {
        Ok(loaded) => loaded,
        Err(e) => panic!("a memory store failed: {e}"),
    };
    let Some(loaded) = loaded else {
        return false;
    };
    assert_eq!(&*loaded.handle, world.handle.as_str());
    assert!(
        *loaded.session == world.session,
        "another session came back"
    );
    let resealed = match world.sessions.reseal(&loaded) {
        Ok(value) => value,
        Err(e) => panic!("reseal: {e}"),
    };
    let again = world.runtime.block_on(world.sessions.load(&resealed, NOW));
    match again {
        Ok(Some(again)) => {
            assert_eq!(&*again.handle, world.handle.as_str());
            assert!(!again.reseal, "a fresh seal asks to be re-sealed");
        }
        _ => panic!("a re-sealed cookie does not load"),
    }
    true
}

/// Applies (position, xor) pairs from `edits` to `bytes`; the first byte, if odd, truncates.
fn edit(mut bytes: Vec<u8>, edits: &[u8]) -> Vec<u8> {
    let Some((&first, pairs)) = edits.split_first() else {
        return bytes;
    };
    if first & 1 == 1 && !bytes.is_empty() {
        bytes.truncate(usize::from(first >> 1) % bytes.len());
    }
    for pair in pairs.chunks_exact(2) {
        if bytes.is_empty() {
            break;
        }
        let at = usize::from(pair[0]) % bytes.len();
        bytes[at] ^= pair[1];
    }
    bytes
}

fn raw_cookie(world: &World, value: &str) {
    if let Some(opened) = world.ring.open(NAME, value) {
        assert!(
            world.cookies.iter().any(|c| c == value),
            "a value that was never sealed opens"
        );
        assert_eq!(opened.plaintext, world.ticket);
        assert_eq!(opened.stale_key, value == world.cookies[1]);
        let resealed = match world.ring.seal(NAME, &opened.plaintext) {
            Ok(value) => value,
            Err(e) => panic!("seal: {e}"),
        };
        let reopened = world.ring.open(NAME, &resealed);
        assert!(reopened.is_some_and(|r| r.plaintext == world.ticket && !r.stale_key));
    }
    let loads = load(world, value);
    assert_eq!(loads, world.cookies.iter().any(|c| c == value));
}

fn sealed_plaintext(world: &World, plaintext: &[u8]) {
    let plaintext = &plaintext[..plaintext.len().min(MAX_PLAINTEXT_LEN)];
    let sealed = match world.ring.seal(NAME, plaintext) {
        Ok(value) => value,
        Err(e) => panic!("seal: {e}"),
    };
    let opened = world.ring.open(NAME, &sealed);
    assert!(opened.is_some_and(|o| o.plaintext == plaintext && !o.stale_key));
    assert_eq!(load(world, &sealed), plaintext == world.ticket);
}

fn tampered_cookie(world: &World, which: u8, edits: &[u8]) {
    let original = &world.cookies[usize::from(which & 1)];
    let bytes = edit(original.as_bytes().to_vec(), edits);
    let value = String::from_utf8_lossy(&bytes);
    let same = value == original.as_str();
    assert_eq!(world.ring.open(NAME, value.as_bytes()).is_some(), same);
    assert_eq!(load(world, &value), same);
}

fn put_record(world: &World, record: &[u8]) {
    let ttl = Duration::from_secs(600);
    let done = world.runtime.block_on(async {
        world.store.delete(&world.record_name).await?;
        world.store.put_new(&world.record_name, record, ttl).await
    });
    assert!(matches!(done, Ok(true)), "the memory store refused a write");
}

fn tampered_record(world: &World, mode: u8, edits: &[u8]) {
    let record = if mode & 1 == 0 {
        edit(world.record.clone(), edits)
    } else {
        edits.to_vec()
    };
    put_record(world, &record);
    load(world, &world.cookies[0]);
    let listed = world
        .runtime
        .block_on(world.sessions.list_for_sub("alice", NOW));
    match listed {
        Ok(list) => {
            for summary in list {
                assert_eq!(summary.handle, world.handle);
                assert_eq!(summary.created_at, NOW);
                assert_eq!(summary.user_agent.as_deref(), Some("fuzz"));
            }
        }
        Err(e) => panic!("a memory store failed: {e}"),
    }
    put_record(world, &world.record);
}

pub fn fuzz(data: &[u8]) {
    let world = &*WORLD;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => raw_cookie(world, &String::from_utf8_lossy(rest)),
        1 => sealed_plaintext(world, rest),
        2 => tampered_cookie(world, mode >> 2, rest),
        _ => tampered_record(world, mode >> 2, rest),
    }
}
