//! `pagescope-fixture SCENARIO...`: the fixture process (see the library
//! docs). Tests, benchmarks and `pagescope demo` start it.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    pagescope_fixture::serve(&args);
}
