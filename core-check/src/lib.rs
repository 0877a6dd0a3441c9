//! Tests of paychan built without its `runtime` feature (no tokio, axum, hyper or tower): the
//! protocol core and the client's pure rules, as a browser client will use them. The tests are
//! in `tests/`; this library is empty.
