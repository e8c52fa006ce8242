fn main() {
    println!("chimap {}", chimap::VERSION);
}
